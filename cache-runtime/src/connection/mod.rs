//! Connections: one deadpool pool of multiplexed redis-rs connections, and
//! the deadlines and breaker around every command.
//!
//! deadpool-redis's stock manager sends `UNWATCH` + `PING` on every checkout,
//! which doubles the round trips of a cache hit. This manager creates
//! connections through deadpool-redis but recycles by checking a flag that
//! failed commands set, so a checkout costs no I/O.
//!
//! Connections are multiplexed, so they are not checked out per call: a few
//! (one per core, at most `pool_size`) are kept checked out, and a call
//! clones a handle to one of them, round robin; concurrent calls pipeline on
//! the same sockets. A place whose connection failed is refilled from the
//! pool by a task, under the connect deadline, which callers wait on: the
//! failed connection is taken out of the pool first, because the kept
//! connections may hold every permit (`pool_size(1)`, or as many cores as
//! `pool_size`).
//!
//! A connection is retired after an I/O error and after a command that
//! timed out: a socket that silently stopped answering (a NAT or firewall
//! that dropped its state, a frozen VM) would otherwise be reused until the
//! kernel gives up on it, many minutes later. TCP keepalive finds the idle
//! ones.

mod kept;
mod manager;

#[cfg(any(feature = "sentinel", feature = "cluster"))]
pub(crate) use manager::tcp_settings;
pub(crate) use manager::{Conn, RedisManager, Source};
use manager::{Creator, refused_credentials, stale_cluster_map, with_keepalive};

use crate::breaker::{Admission, Breaker, Kind};
use crate::error::{Fault, SlotMove};
use deadpool::managed;
use redis::RedisError;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Deadlines applied to Redis work.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadlines {
    /// Waiting for a pooled connection, including connecting a new one.
    pub connect: Duration,
    /// One command, from send to reply.
    pub command: Duration,
}

impl Deadlines {
    /// The longest one call polled to its end can take under the breaker:
    /// a connection and a command, twice when a kept connection failed
    /// and the call tries again on a new one.
    pub(crate) fn longest_call(&self) -> Duration {
        self.connect.saturating_add(self.command).saturating_mul(2)
    }
}

pub(crate) struct Connections {
    pool: managed::Pool<RedisManager>,
    /// Connections checked out of the pool and kept: calls clone a handle
    /// from one of them, round robin, without touching the pool.
    kept: Box<[kept::Place]>,
    /// Each place's refill under way, if any: one at a time, since a
    /// second one asking the pool too would wait for the permit the first
    /// one's new connection takes.
    refills: Box<[kept::Refilling]>,
    next_kept: AtomicUsize,
    /// Operations admitted and not yet settled or dropped.
    in_flight: AtomicU64,
    deadlines: Deadlines,
    breaker: Breaker,
    /// Behind Sentinel, `READONLY` means the master moved: the connection
    /// is replaced through the sentinels. Elsewhere it is a replica doing
    /// its job (hits still work), a server error like any other.
    readonly_means_moved: bool,
    is_cluster: bool,
    /// The longest string a reply may carry into the cache: an entry of
    /// `max_value_bytes` plus its header. Longer ones are never decoded.
    max_reply_string: usize,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("status", &self.pool.status())
            .field("deadlines", &self.deadlines)
            .field("breaker", &self.breaker)
            .finish()
    }
}

impl Connections {
    /// `kept`: how many connections to keep checked out; `None`: one per
    /// core, at most `pool_size`.
    pub(crate) fn new(
        source: Source,
        pool_size: usize,
        kept: Option<usize>,
        deadlines: Deadlines,
        breaker: Breaker,
        max_value_bytes: usize,
    ) -> Result<Self, crate::Error> {
        // Commands are bounded by `run`'s own deadline, which retires the
        // connection when it passes.
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(deadlines.connect))
            .set_response_timeout(None);
        // Behind Sentinel, or in a cluster after a failover, `READONLY`
        // comes from a demoted master.
        let readonly_means_moved = !matches!(source, Source::Direct(_));
        let is_cluster = source.is_cluster();
        let creator = match source {
            Source::Direct(info) => Creator::Direct(
                deadpool_redis::Manager::new_with_config(with_keepalive(info), config)
                    .map_err(|e| crate::Error::InvalidConfig(format!("invalid Redis connection settings: {e}")))?,
            ),
            #[cfg(feature = "sentinel")]
            Source::Sentinel(client) => Creator::Sentinel(client, config),
            #[cfg(feature = "cluster")]
            Source::Cluster(client) => Creator::Cluster(client),
        };
        let pool = managed::Pool::builder(RedisManager { creator })
            .max_size(pool_size)
            .build()
            .map_err(|e| crate::Error::InvalidConfig(format!("could not build the connection pool: {e}")))?;
        // A multiplexed connection pipelines everything sent on it, and
        // Redis runs commands one at a time: more connections than cores
        // add syscalls, not throughput.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // A cluster connection multiplexes over one connection per node
        // already, through a task of its own: a second one adds a task hop
        // per command, not throughput (`BENCH_ONLY=cluster cargo bench
        // --features cluster --bench cache`: p50 1.3x the raw client with
        // two, 1.2x with one).
        let kept = match kept {
            Some(kept) => kept.min(pool_size).max(1),
            None if is_cluster => 1,
            None => pool_size.min(cores).max(1),
        };
        let places = (0..kept).map(|_| Arc::new(RwLock::new(None))).collect();
        let refills = (0..kept).map(|_| std::sync::Mutex::new(None)).collect();
        Ok(Self {
            pool,
            kept: places,
            refills,
            next_kept: AtomicUsize::new(0),
            in_flight: AtomicU64::new(0),
            deadlines,
            breaker,
            readonly_means_moved,
            is_cluster,
            max_reply_string: max_value_bytes.saturating_add(crate::codec::HEADER_ALLOWANCE),
        })
    }

    /// Redis operations under way, and whether the breaker's probe is out.
    pub(crate) fn in_flight(&self) -> (u64, bool) {
        (self.in_flight.load(Relaxed), self.breaker.probing())
    }

    /// Whether this is a Redis Cluster, where one script may only touch
    /// keys of one slot.
    pub(crate) fn is_cluster(&self) -> bool {
        self.is_cluster
    }

    /// The longest one operation may take: a connection, then a command.
    pub(crate) fn longest_round_trip(&self) -> Duration {
        self.deadlines.connect.saturating_add(self.deadlines.command)
    }

    /// Runs one Redis operation under the breaker and the deadlines.
    ///
    /// `op` gets a connection handle; server errors it returns (WRONGTYPE,
    /// OOM, READONLY) count as a healthy server, timeouts and I/O errors
    /// count against the breaker.
    pub(crate) async fn run<T, F, Fut>(&self, op: F) -> Result<T, Fault>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let admission = self.breaker.admit();
        if admission.kind() == Kind::Rejected {
            return Err(Fault::BreakerOpen);
        }
        // Both guards hold across the await: a caller that gives up
        // mid-operation gives back the probe and the count.
        let _counted = InFlight::count(&self.in_flight);
        let result = self.run_admitted(op).await;
        self.settle(admission, result)
    }

    /// Like [`run`](Self::run), but tries Redis even while the breaker is
    /// open: for write paths, which must learn whether they reached Redis.
    pub(crate) async fn run_unguarded<T, F, Fut>(&self, op: F) -> Result<T, Fault>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let _counted = InFlight::count(&self.in_flight);
        let result = self.run_admitted(op).await;
        self.settle(self.breaker.unguarded(), result)
    }

    /// Feeds an outcome to the breaker. A server error means a live server.
    fn settle<T>(&self, admission: Admission<'_>, result: Result<T, Fault>) -> Result<T, Fault> {
        match &result {
            Ok(_) | Err(Fault::Server(_) | Fault::SlotMigrating(_)) => self.breaker.record_success(admission),
            Err(_) => {
                if self.breaker.record_failure(admission) {
                    tracing::warn!(
                        target: "cache_runtime",
                        "Redis keeps failing: the circuit breaker is open, cached calls skip Redis for now"
                    );
                }
            }
        }
        result
    }

    async fn run_admitted<T, F, Fut>(&self, op: F) -> Result<T, Fault>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let (conn, fresh, place) = match self.kept_connection() {
            Ok((conn, place)) => (conn, false, place),
            Err(place) => (self.checkout(place).await?, true, place),
        };
        match self.command(&op, conn).await {
            // A kept connection can have died quietly (a server restart, a
            // CLIENT KILL) and only say so now: try once on a fresh one
            // rather than fail the call, or the breaker's probe.
            Err(Fault::Connection(_)) if !fresh => {
                let conn = self.checkout(place).await?;
                self.command(&op, conn).await
            }
            result => result,
        }
    }

    /// One command under the command deadline.
    async fn command<T, F, Fut>(&self, op: &F, conn: Conn) -> Result<T, Fault>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let broken = conn.broken.clone();
        match tokio::time::timeout(self.deadlines.command, op(conn)).await {
            Err(_) => {
                // A socket that stopped answering looks exactly like this:
                // retire it, or every later call waits on it too.
                broken.store(true, Relaxed);
                Err(Fault::Timeout)
            }
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if e.is_timeout() {
                    broken.store(true, Relaxed);
                    Err(Fault::Timeout)
                } else if e.is_unrecoverable_error()
                    || e.is_io_error()
                    || e.is_connection_dropped()
                    || (self.readonly_means_moved
                        && e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly))
                    || (self.is_cluster && stale_cluster_map(&e))
                {
                    broken.store(true, Relaxed);
                    Err(Fault::Connection(e.to_string()))
                } else if let redis::ErrorKind::Server(
                    redis::ServerErrorKind::TryAgain | redis::ServerErrorKind::Ask | redis::ServerErrorKind::Moved,
                ) = e.kind()
                {
                    // redis-rs follows redirections, but gives up on some:
                    // those of an `MGET`, and an `ASK` whose `ASKING` another
                    // command on the shared connection consumed.
                    let ask = match e.kind() {
                        redis::ErrorKind::Server(redis::ServerErrorKind::Ask) => e
                            .redirect_node()
                            .and_then(|(node, _slot)| node.rsplit_once(':'))
                            .and_then(|(host, port)| Some((host.to_owned(), port.parse().ok()?))),
                        _ => None,
                    };
                    Err(Fault::SlotMigrating(Box::new(SlotMove { message: e.to_string(), ask })))
                } else {
                    Err(Fault::Server(e.to_string()))
                }
            }
        }
    }
}

/// Counts one operation as in flight until dropped, settled or not.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn count(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}
