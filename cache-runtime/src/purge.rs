//! `Cache::purge`: reclaiming Redis memory from entries no reader can be
//! served any more, in the background and at a bounded rate. The Redis
//! side (the scan, the script) is in `store/purge.rs`.

use crate::Cache;
use crate::error::Error;
use crate::keys::{entry_namespace, scan_pattern};
use crate::store::Redis;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::AbortHandle;

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

/// A purge's task as its handles see it: what it has done so far, and how
/// it ended.
#[derive(Debug)]
struct Running {
    examined: AtomicU64,
    deleted: AtomicU64,
    /// `Some` once the task returned; closed without a value if it was
    /// dropped first (aborted, or its runtime shut down).
    ended: watch::Receiver<Option<Result<u64, Error>>>,
    task: AbortHandle,
    /// The runtime the task runs on: only a caller on the same one joins
    /// it, since another runtime may be idle, and its task never polled.
    runtime: tokio::runtime::Id,
    /// Set by whoever joins: a pass over every key, begun after the join,
    /// is owed (the one under way may have passed keys that a `clear`
    /// since has made dead).
    again: AtomicBool,
}

impl Running {
    /// Told by the channel, not the task: a dropped task's future is gone
    /// (and its handles woken) before the task counts as finished.
    fn has_ended(&self) -> bool {
        self.ended.borrow().is_some() || self.ended.has_changed().is_err()
    }
}

/// The purge this cache is running, if any: `Cache::purge` joins it rather
/// than scanning the same keys twice as fast as either asked.
#[derive(Debug, Default)]
pub(crate) struct Purging(Mutex<Weak<Running>>);

/// A purge under way: its counts so far, and its end. Awaiting it gives the
/// number of entries deleted. Dropping it does not stop the purge; see
/// [`Cache::purge`].
#[must_use = "a purge runs on without its handle; await it to learn whether it finished"]
pub struct Purge {
    /// `None` for a memory-only cache, which has nothing to purge.
    running: Option<Arc<Running>>,
    end: Pin<Box<dyn Future<Output = Result<u64, Error>> + Send>>,
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
    fn nothing() -> Self {
        Purge { running: None, end: Box::pin(std::future::ready(Ok(0))) }
    }

    fn of(running: Arc<Running>) -> Self {
        let (mut ended, handle) = (running.ended.clone(), running.clone());
        let end = async move {
            // Cloned out: the borrow of the channel must not live across
            // the return.
            let outcome = ended.wait_for(Option::is_some).await.map(|ended| (*ended).clone());
            match outcome {
                Ok(Some(outcome)) => outcome,
                _ => Err(Error::Stopped(format!(
                    "the purge was aborted, or its runtime shut down, after deleting {} entries",
                    handle.deleted.load(Relaxed)
                ))),
            }
        };
        Purge { running: Some(running), end: Box::pin(end) }
    }

    /// Keys of this cache examined so far.
    pub fn examined(&self) -> u64 {
        self.running.as_ref().map_or(0, |running| running.examined.load(Relaxed))
    }

    /// Entries deleted so far.
    pub fn deleted(&self) -> u64 {
        self.running.as_ref().map_or(0, |running| running.deleted.load(Relaxed))
    }

    /// Whether the purge has ended, done or failed.
    pub fn is_finished(&self) -> bool {
        self.running.as_ref().is_none_or(|running| running.has_ended())
    }

    /// Stops the purge at its next pause or command (a batch Redis is
    /// running completes there: each is one atomic script), for every
    /// handle of it; awaiting one then returns [`Error::Stopped`].
    pub fn abort(&self) {
        if let Some(running) = &self.running {
            running.task.abort();
        }
    }
}

impl Future for Purge {
    type Output = Result<u64, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.end.as_mut().poll(cx)
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
    /// A purge this cache is already running on the caller's runtime is
    /// joined, not started twice: the handle follows it, at the rate it
    /// started with, and it makes one more pass over every key after the
    /// one under way (which may have passed keys a `clear` since has made
    /// dead), so that a joined purge, too, reclaims what was dead when it
    /// was asked for.
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
        if self.is_memory_only() {
            return Ok(Purge::nothing());
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::InvalidConfig("purge runs on a Tokio runtime; call it inside one".to_owned()))?;
        let mut purging = self.purging().0.lock().unwrap_or_else(PoisonError::into_inner);
        let joinable = |running: &Arc<Running>| running.runtime == runtime.id() && !running.has_ended();
        if let Some(running) = purging.upgrade().filter(joinable) {
            running.again.store(true, Relaxed);
            return Ok(Purge::of(running));
        }
        let (tell, ended) = watch::channel(None);
        // Spawned paused on `start`: the task needs its own `Running`,
        // which needs the task's abort handle.
        let (start, started) = tokio::sync::oneshot::channel::<Arc<Running>>();
        let cache = self.clone();
        let task = runtime.spawn(async move {
            let Ok(running) = started.await else { return };
            run(cache, rate, &running, tell).await;
        });
        let running = Arc::new(Running {
            examined: AtomicU64::new(0),
            deleted: AtomicU64::new(0),
            ended,
            task: task.abort_handle(),
            runtime: runtime.id(),
            again: AtomicBool::new(true),
        });
        // Held by the task while it runs: a purge whose handles were all
        // dropped is still joined.
        let _ = start.send(running.clone());
        *purging = Arc::downgrade(&running);
        Ok(Purge::of(running))
    }
}

/// Passes over every key until no join asked for another, then tells the
/// handles how it ended.
async fn run(cache: Cache, rate: PurgeRate, running: &Running, tell: watch::Sender<Option<Result<u64, Error>>>) {
    let Some(redis) = cache.backend().redis() else {
        tell.send_replace(Some(Ok(0)));
        return;
    };
    loop {
        while running.again.swap(false, Relaxed) {
            if let Err(error) = pass(&cache, redis, rate, running).await {
                tell.send_replace(Some(Err(error)));
                return;
            }
        }
        // Ended under the lock joiners take: none joins between the last
        // look at `again` and the end, owed a pass it would not get.
        let _purging = cache.purging().0.lock().unwrap_or_else(PoisonError::into_inner);
        if !running.again.load(Relaxed) {
            tell.send_replace(Some(Ok(running.deleted.load(Relaxed))));
            return;
        }
    }
}

/// One walk over every node's keys, step by step at `rate`.
async fn pass(cache: &Cache, redis: &Redis, rate: PurgeRate, progress: &Running) -> Result<(), Error> {
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
    Ok(())
}
