//! The connections kept checked out of the pool, in places that calls
//! share round robin, and how a broken one is replaced.
//!
//! A place is refilled by a task of its own, which callers wait on, each
//! under its own deadline. Were the refill run inside a caller's future, a
//! caller parked mid-connect (polled once, then kept without being polled:
//! a `select!` loser kept for later) would hold the place, and with
//! `pool_size(1)` the pool's only permit, for as long as it lives; every
//! later call would wait out the connect deadline and fail.

use super::*;
use std::time::Instant;
use tokio::sync::watch;

/// One kept connection's place, shared with the task refilling it.
pub(super) type Place = Arc<RwLock<Option<managed::Object<RedisManager>>>>;

/// How a refill ended: `None` while it runs.
pub(super) type Refill = watch::Receiver<Option<Result<(), Fault>>>;

/// A place's refill under way, if any, and when it started.
pub(super) type Refilling = std::sync::Mutex<Option<(Refill, Instant)>>;

impl Connections {
    /// A handle on a kept, healthy connection and its place, without
    /// waiting; or the index of the place to fill.
    pub(super) fn kept_connection(&self) -> Result<(Conn, usize), usize> {
        let index = self.next_kept.fetch_add(1, Relaxed) % self.kept.len();
        let Ok(place) = self.kept[index].read() else { return Err(index) };
        match place.as_ref() {
            Some(pooled) if !pooled.broken.load(Relaxed) => Ok((self.handle(pooled), index)),
            _ => Err(index),
        }
    }

    /// Fills an empty or broken place from the pool, within the connect
    /// deadline; or, when another caller refilled it meanwhile, uses that.
    pub(super) async fn checkout(&self, index: usize) -> Result<Conn, Fault> {
        let mut refill = match self.refill(index) {
            Ok(conn) => return Ok(conn),
            Err(refill) => refill,
        };
        let waited = tokio::time::timeout(self.deadlines.connect, refill.wait_for(Option::is_some)).await;
        match waited.map(|ended| ended.map(|outcome| outcome.clone())) {
            Err(_) => Err(Fault::Timeout),
            // Its task was dropped unfinished: its runtime is shutting
            // down. Yield, so that the runtime can drop this caller too: a
            // caller calling in a loop would otherwise fail at once, again
            // and again, without ever giving the runtime back its thread.
            Ok(Err(_)) => {
                tokio::task::yield_now().await;
                Err(Fault::Connection("the connection's refill was cancelled".to_owned()))
            }
            Ok(Ok(Some(Ok(())))) => {
                self.healthy(index).ok_or_else(|| Fault::Connection("the new connection failed at once".to_owned()))
            }
            Ok(Ok(Some(Err(fault)))) => Err(fault),
            Ok(Ok(None)) => Err(Fault::Connection("the connection's refill ended without a word".to_owned())),
        }
    }

    /// The place's connection if it is healthy; else the refill under way,
    /// started now if none is.
    fn refill(&self, index: usize) -> Result<Conn, Refill> {
        let mut refilling = self.refills[index].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(conn) = self.healthy(index) {
            return Ok(conn);
        }
        if let Some((refill, started)) = refilling.as_ref() {
            // Unfinished, its task alive, and younger than its own
            // deadline: join it. Older, its task is not being polled (its
            // runtime idle, a current-thread one between two `block_on`s):
            // this caller's runtime refills instead.
            let polled = started.elapsed() <= self.deadlines.connect;
            if refill.borrow().is_none() && refill.has_changed().is_ok() && polled {
                return Err(refill.clone());
            }
        }
        self.retire(index);
        let (done, refill) = watch::channel(None);
        *refilling = Some((refill.clone(), Instant::now()));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            done.send_replace(Some(Err(Fault::Connection("no tokio runtime to connect on".to_owned()))));
            return Err(refill);
        };
        let (pool, place, connect) = (self.pool.clone(), self.kept[index].clone(), self.deadlines.connect);
        // Dropped with the task, run or not: waiters then hear it ended.
        runtime.spawn(async move {
            let outcome = match tokio::time::timeout(connect, pool.get()).await {
                Err(_) => Err(Fault::Timeout),
                Ok(Ok(pooled)) => {
                    if let Ok(mut place) = place.write() {
                        // Empty: retired above, and no other refill of this
                        // place runs. Otherwise the new one goes back.
                        if place.is_none() {
                            *place = Some(pooled);
                        }
                    }
                    Ok(())
                }
                Ok(Err(managed::PoolError::Backend(e))) if refused_credentials(&e) => Err(Fault::Connection(format!(
                    "Redis refused the credentials: check the password or ACL user in the URL ({e})"
                ))),
                Ok(Err(e)) => Err(Fault::Connection(e.to_string())),
            };
            done.send_replace(Some(outcome));
        });
        Err(refill)
    }

    /// The place's connection, if it is there and healthy.
    pub(super) fn healthy(&self, index: usize) -> Option<Conn> {
        let place = self.kept[index].read().ok()?;
        let pooled = place.as_ref().filter(|pooled| !pooled.broken.load(Relaxed))?;
        Some(self.handle(pooled))
    }

    /// Takes the place's broken connection out of the pool, freeing its
    /// permit for the replacement. The socket closes as the last call
    /// still using it lets go.
    pub(super) fn retire(&self, index: usize) {
        let broken = match self.kept[index].write() {
            Ok(mut place) => place.take_if(|kept| kept.broken.load(Relaxed)),
            Err(_) => None,
        };
        if let Some(broken) = broken {
            drop(managed::Object::take(broken));
        }
    }
}
