//! Refresh-ahead: a hit on an entry past its `refresh_ahead` share returns
//! at once and renews the entry in a task of its own, under the stampede
//! lock, unless someone renewed it since or is renewing it now.

use super::finish::Settle;
use super::lock::{LockGuard, token};
use super::{Call, EntryKeys, Observed};
use crate::Cache;
use crate::codec::EntryTimes;
use crate::flight::Role;
use crate::keys::KeyHash;
use crate::observe::{Observer, Outcome};
use crate::output::Storage;
use crate::policy::Plan;
use crate::store::{LockReply, StoreMode};
use std::time::Duration;
use tracing::Instrument;

/// After a renewal whose body failed, the next waits this long.
const BACK_OFF: Duration = Duration::from_secs(1);
/// While another process renews an entry, hits here ask again this often.
const ELSEWHERE_BACK_OFF: Duration = Duration::from_millis(50);

/// How a renewal ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Renewal {
    /// Renewed, or nothing to do.
    Done,
    /// Another process holds the lock: it is renewing the entry.
    Elsewhere,
    /// The body's output was not cacheable (an `Err`), or it panicked.
    Failed,
}

/// Ends a renewal's claim on its key, also when the renewal panics or its
/// task is dropped before it ran (a runtime shutting down).
struct Claim {
    cache: Cache,
    hash: KeyHash,
    outcome: Renewal,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let back_off = match self.outcome {
            Renewal::Done => None,
            Renewal::Elsewhere => Some(ELSEWHERE_BACK_OFF),
            Renewal::Failed => Some(BACK_OFF),
        };
        self.cache.renewals().release(self.hash, back_off);
    }
}

/// Starts a renewal of `hash` in a task of its own, unless one is under
/// way in this process or failed recently.
pub(super) fn spawn<R, F>(
    cache: &Cache,
    plan: &'static Plan<'static>,
    hash: KeyHash,
    storage: Storage<R>,
    seen: EntryTimes,
    compute: F,
) where
    F: Future<Output = R> + Send + 'static,
    R: Send + 'static,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    if !cache.renewals().claim(hash) {
        return;
    }
    let mut claim = Claim { cache: cache.clone(), hash, outcome: Renewal::Failed };
    runtime.spawn(async move {
        claim.outcome = Box::pin(run(&claim.cache, plan, hash, storage, seen, compute)).await;
        // Releases the claim, with a back-off that depends on the outcome.
        drop(claim);
    });
}

async fn run<R, F: Future<Output = R>>(
    cache: &Cache,
    plan: &Plan<'_>,
    hash: KeyHash,
    storage: Storage<R>,
    seen: EntryTimes,
    compute: F,
) -> Renewal {
    let Some(ttl) = plan.ttl.or(cache.default_ttl()) else { return Renewal::Done };
    let observer: Observer<'_> = cache.observer(plan);
    observer.key(hash);
    let span = observer.span.clone();
    let keys = EntryKeys::new(cache.key_prefix(), plan.prefix, &observer.site.version_keys, hash);
    let call = Call::new(cache, plan, ttl, storage, hash, &keys, &observer);
    call.renew(seen, compute).instrument(span).await
}

impl<R> Call<'_, R> {
    /// Leads the key in this process and takes the lock, unless someone
    /// renewed the entry since `seen` or is renewing it now; then computes
    /// and overwrites.
    async fn renew<F: Future<Output = R>>(&self, seen: EntryTimes, compute: F) -> Renewal {
        let Role::Leader(leader) = self.cache.flights().join(self.keys.entry()) else { return Renewal::Done };
        let (token, lock) = (token(), self.keys.lock());
        // Armed before asking, as in `lead`.
        let mut guard = LockGuard::new(self.cache, lock.clone(), token.clone());
        let observed = match self.lock(&lock, &token, seen.fresh_until_ms).await {
            Some(LockReply::Lead { observed, versions }) => Observed { versions, entry: observed },
            reply => {
                guard.disarm();
                return match reply {
                    Some(LockReply::Wait) => Renewal::Elsewhere,
                    // Renewed already, or the backend is unavailable: the
                    // entry stays until its TTL.
                    _ => Renewal::Done,
                };
            }
        };
        leader.computing();
        let output = self.compute(Outcome::Renewal, compute).await;
        leader.close();
        let cacheable = (self.storage.cacheable)(&output);
        // Replaces only the entry it saw: a write-through since then wins.
        let settle = Settle {
            observed: Some(observed),
            guard: Some(guard),
            stale: None,
            mode: StoreMode::Replace,
            share: leader.has_waiters(),
        };
        if let Some(shared) = self.settle(output, settle).await.shared {
            leader.finish(shared);
        }
        if cacheable { Renewal::Done } else { Renewal::Failed }
    }
}
