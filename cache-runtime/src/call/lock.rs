//! The stampede lock as a caller holds it: a token only it knows, and a
//! guard that releases the lock whatever happens to the holder.

use crate::Cache;
use crate::observe::{Event, note};

/// How long after a dropped holder's release the lock is released again.
const RELEASE_AGAIN: std::time::Duration = std::time::Duration::from_millis(100);

/// Releases the stampede lock if its holder never got to store (an `Err`,
/// a panic, its future dropped): from a spawned task, since `Drop` cannot
/// wait. Should that fail, the lock expires by its TTL.
pub(super) struct LockGuard {
    cache: Cache,
    pub(super) lock: String,
    pub(super) token: String,
    armed: bool,
}

impl LockGuard {
    pub(super) fn new(cache: &Cache, lock: String, token: String) -> Self {
        Self { cache: cache.clone(), lock, token, armed: true }
    }

    /// The lock was released, by a store or explicitly.
    pub(super) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.armed {
            release_from_drop(&self.cache, vec![std::mem::take(&mut self.lock)], std::mem::take(&mut self.token));
        }
    }
}

/// Releases `locks`, all under `token`, from a spawned task, since `Drop`
/// cannot wait; should that fail, they expire by their TTL. Then once
/// more: a holder dropped while its lock request was on the wire may see
/// that request run after the first release (the two can take different
/// connections), taking a lock nobody would release before it expires.
/// The second release comes when the request has surely run; only our
/// token is ever deleted.
fn release_from_drop(cache: &Cache, locks: Vec<String>, token: String) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    let cache = cache.clone();
    runtime.spawn(async move {
        let held: Vec<(&str, &str)> = locks.iter().map(|lock| (lock.as_str(), token.as_str())).collect();
        for again in [false, true] {
            if again {
                tokio::time::sleep(RELEASE_AGAIN).await;
            }
            if let Err(fault) = cache.backend().release_many(&held).await {
                note(&cache.registry().general, cache.warnings(), Event::Fault(&fault));
            }
        }
    });
}

/// A fresh lock token: only its holder can release the lock.
pub(super) fn token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl Cache {
    /// Releases a lock we hold, counting a failure outside any prefix.
    pub(crate) async fn release_lock(&self, lock: &str, token: &str) {
        if let Err(fault) = self.backend().release(lock, token).await {
            note(&self.registry().general, self.warnings(), Event::Fault(&fault));
        }
    }
}

/// The locks a bulk call's claiming read asks for, before it has heard
/// which it got (`store::claim`): a call dropped while the script runs may
/// hold any of them. Releases them all should it be dropped armed, as
/// [`LockGuard`] does one; once the reply is in, [`split`](Self::split)
/// hands each lock taken to a guard of its own.
pub(super) struct ClaimGuard {
    cache: Cache,
    pub(super) locks: Vec<String>,
    pub(super) token: String,
    armed: bool,
}

impl ClaimGuard {
    pub(super) fn new(cache: &Cache, locks: Vec<String>) -> Self {
        Self { cache: cache.clone(), locks, token: token(), armed: true }
    }

    /// A guard for each lock that `taken` says is ours, in the order of
    /// the locks; the others were never ours.
    pub(super) fn split(mut self, taken: impl Fn(usize) -> bool) -> Vec<Option<LockGuard>> {
        self.armed = false;
        let locks = std::mem::take(&mut self.locks);
        locks
            .into_iter()
            .enumerate()
            .map(|(i, lock)| taken(i).then(|| LockGuard::new(&self.cache, lock, self.token.clone())))
            .collect()
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if self.armed {
            release_from_drop(&self.cache, std::mem::take(&mut self.locks), std::mem::take(&mut self.token));
        }
    }
}
