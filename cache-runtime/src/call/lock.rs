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
        if !self.armed {
            return;
        }
        let (cache, lock, token) =
            (self.cache.clone(), std::mem::take(&mut self.lock), std::mem::take(&mut self.token));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                cache.release_lock(&lock, &token).await;
                // A holder dropped while its lock request was on the wire:
                // that request may still run after the release above (the
                // two can take different connections), taking a lock that
                // nobody would release before it expires. Once more, when
                // the request has surely run; our token alone is deleted.
                tokio::time::sleep(RELEASE_AGAIN).await;
                cache.release_lock(&lock, &token).await;
            });
        }
    }
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
