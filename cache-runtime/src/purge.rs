//! `Cache::purge`: reclaiming Redis memory from entries no reader can be
//! served any more, in the background and at a bounded rate. The Redis
//! side (the scan, the script) is in `store/purge.rs`.

use crate::Cache;
use crate::error::Error;
use crate::keys::{entry_namespace, scan_pattern};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// How fast [`Cache::purge`] goes: at most `keys_per_second` keys examined
/// per second, in steps of `batch` keys (one `SCAN ... COUNT batch` and one
/// short script per namespace found in it), with a pause between steps.
/// Each step is a few commands of O(batch) work, so Redis keeps serving
/// everything else in between.
///
/// ```
/// use cache_runtime::PurgeRate;
///
/// let gentle = PurgeRate::keys_per_second(1_000).batch(50);
/// assert_eq!(gentle.pause(), std::time::Duration::from_millis(50));
/// assert_eq!(PurgeRate::default(), PurgeRate::keys_per_second(10_000));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeRate {
    keys_per_second: u32,
    batch: u32,
}

impl PurgeRate {
    /// The most keys examined per step.
    pub const MAX_BATCH: u32 = 1000;

    /// At most `keys` keys examined per second (at least 1), in batches of
    /// a tenth of that (from 10 to [`MAX_BATCH`](Self::MAX_BATCH)).
    pub fn keys_per_second(keys: u32) -> Self {
        let keys = keys.max(1);
        Self { keys_per_second: keys, batch: (keys / 10).clamp(10, Self::MAX_BATCH) }
    }

    /// Keys examined per step, clamped to [1, [`MAX_BATCH`](Self::MAX_BATCH)].
    pub fn batch(mut self, keys: u32) -> Self {
        self.batch = keys.clamp(1, Self::MAX_BATCH);
        self
    }

    /// The pause a step is spread over: `batch / keys_per_second`.
    pub fn pause(&self) -> Duration {
        Duration::from_secs_f64(f64::from(self.batch) / f64::from(self.keys_per_second))
    }
}

impl Default for PurgeRate {
    /// 10,000 keys a second, 1,000 per step.
    fn default() -> Self {
        Self::keys_per_second(10_000)
    }
}

/// What a purge has done so far, shared with its task.
#[derive(Debug, Default)]
struct Progress {
    examined: AtomicU64,
    deleted: AtomicU64,
}

/// A purge under way: its counts so far, and its end. Awaiting it gives the
/// number of entries deleted. Dropping it does not stop the purge; see
/// [`Cache::purge`].
#[must_use = "a purge runs on without its handle; await it to learn whether it finished"]
pub struct Purge {
    progress: Arc<Progress>,
    /// The task while it runs; `None` once it has been awaited to its end
    /// (or for a memory-only cache, which has nothing to purge).
    task: Option<tokio::task::JoinHandle<Result<u64, Error>>>,
}

impl std::fmt::Debug for Purge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Purge")
            .field("examined", &self.examined())
            .field("deleted", &self.deleted())
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl Purge {
    /// Keys of this cache examined so far.
    pub fn examined(&self) -> u64 {
        self.progress.examined.load(Relaxed)
    }

    /// Entries deleted so far.
    pub fn deleted(&self) -> u64 {
        self.progress.deleted.load(Relaxed)
    }

    /// Whether the purge has ended, done or failed.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(tokio::task::JoinHandle::is_finished)
    }

    /// Stops the purge at its next pause or command (a batch Redis is
    /// running completes there: each is one atomic script); awaiting it
    /// then returns [`Error::Stopped`].
    pub fn abort(&self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Future for Purge {
    type Output = Result<u64, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let deleted = self.deleted();
        let Some(task) = self.task.as_mut() else { return Poll::Ready(Ok(deleted)) };
        let outcome = std::task::ready!(Pin::new(task).poll(cx));
        // A join handle must not be polled again once it has answered.
        self.task = None;
        Poll::Ready(outcome.unwrap_or_else(|e| {
            let why = if e.is_cancelled() { "aborted, or its runtime shut down" } else { "its task panicked" };
            Err(Error::Stopped(format!("the purge was {why}, after deleting {deleted} entries")))
        }))
    }
}

impl Cache {
    /// Deletes, in the background, the entries of this cache's key prefix
    /// that can no longer be served: after [`clear`](Self::clear), every
    /// entry; otherwise those of invalidated prefixes. Entries still
    /// served, version keys, locks, tombstones and every key outside this
    /// key prefix (another cache's, `app2:…` next to `app:…`) are left
    /// alone. For reclaiming memory sooner than the entries' TTLs would:
    /// correctness never needs it.
    ///
    /// It walks the keys with `SCAN` (every master of a cluster) at
    /// `rate` and replaces entries with small tombstones (never an empty
    /// key; see docs/CONSISTENCY.md), a batch at a time: no `KEYS`, no
    /// large `DEL`, nothing that blocks Redis. Its work is a task on the
    /// calling runtime: it goes on when the returned [`Purge`] is dropped
    /// or the caller is cancelled, and ends with that runtime or
    /// [`Purge::abort`]. Await the handle for the count deleted, or poll
    /// [`Purge::deleted`]. A failed Redis command ends it with that error;
    /// running it again resumes the work (what is deleted stays deleted).
    /// A memory-only cache has nothing to purge (`clear` empties it).
    ///
    /// ```no_run
    /// # async fn run(cache: cache_runtime::Cache) -> Result<(), cache_runtime::Error> {
    /// use cache_runtime::PurgeRate;
    ///
    /// cache.clear().await?;
    /// let purge = cache.purge(PurgeRate::keys_per_second(5_000))?;
    /// let deleted = purge.await?;
    /// # Ok(()) }
    /// ```
    ///
    /// Needs a Tokio runtime: without one it returns
    /// [`Error::InvalidConfig`].
    pub fn purge(&self, rate: PurgeRate) -> Result<Purge, Error> {
        let progress = Arc::new(Progress::default());
        if self.is_memory_only() {
            return Ok(Purge { progress, task: None });
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::InvalidConfig("purge runs on a Tokio runtime; call it inside one".to_owned()))?;
        let task = runtime.spawn(run(self.clone(), rate, progress.clone()));
        Ok(Purge { progress, task: Some(task) })
    }
}

/// Walks every node's keys, step by step at `rate`.
async fn run(cache: Cache, rate: PurgeRate, progress: Arc<Progress>) -> Result<u64, Error> {
    let Some(redis) = cache.backend().redis() else { return Ok(0) };
    let pattern = scan_pattern(cache.key_prefix());
    for node in redis.nodes_to_scan().await? {
        let mut cursor = 0;
        loop {
            let started = Instant::now();
            let (next, keys) = redis.scan(&node, cursor, &pattern, rate.batch).await?;
            let mut by_namespace: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for key in &keys {
                if let Some(namespace) = entry_namespace(cache.key_prefix(), key) {
                    by_namespace.entry(namespace).or_default().push(key.clone());
                }
            }
            for (namespace, entries) in &by_namespace {
                let deleted = redis.delete_dead(cache.key_prefix(), namespace, entries, cache.lock_timeout()).await?;
                progress.deleted.fetch_add(deleted, Relaxed);
            }
            progress.examined.fetch_add(keys.len() as u64, Relaxed);
            if next == 0 {
                break;
            }
            cursor = next;
            // Paced by what a step may examine, not by what it matched:
            // a keyspace of mostly other keys costs Redis the same work.
            tokio::time::sleep(rate.pause().saturating_sub(started.elapsed())).await;
        }
    }
    Ok(progress.deleted.load(Relaxed))
}
