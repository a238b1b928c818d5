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
//! pool, under the connect deadline: the failed connection is taken out of
//! the pool first, because the kept connections may hold every permit
//! (`pool_size(1)`, or as many cores as `pool_size`).
//!
//! A connection is retired after an I/O error and after a command that
//! timed out: a socket that silently stopped answering (a NAT or firewall
//! that dropped its state, a frozen VM) would otherwise be reused until the
//! kernel gives up on it, many minutes later. TCP keepalive finds the idle
//! ones.

use crate::breaker::{Admission, Breaker, Kind};
use crate::error::{Fault, SlotMove};
use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use redis::aio::MultiplexedConnection;
use redis::{FromRedisValue, RedisError};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub(crate) struct RedisManager {
    creator: Creator,
}

/// Where new connections come from.
pub(crate) enum Source {
    /// One server's address.
    Direct(redis::ConnectionInfo),
    /// Whichever server the sentinels call the master now: asked anew for
    /// every connection, so replacing a broken one follows a failover.
    #[cfg(feature = "sentinel")]
    Sentinel(tokio::sync::Mutex<redis::sentinel::SentinelClient>),
    /// A Redis Cluster: each connection maps the slots and follows
    /// `MOVED` and `ASK` by itself.
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster::ClusterClient),
}

enum Creator {
    Direct(deadpool_redis::Manager),
    #[cfg(feature = "sentinel")]
    Sentinel(tokio::sync::Mutex<redis::sentinel::SentinelClient>, redis::AsyncConnectionConfig),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster::ClusterClient),
}

/// One server's multiplexed connection, or a cluster connection (itself
/// multiplexed, with a connection to each node it needs).
#[derive(Clone)]
enum Handle {
    Server(MultiplexedConnection),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

pub(crate) struct PooledConnection {
    conn: Handle,
    broken: Arc<AtomicBool>,
}

impl managed::Manager for RedisManager {
    type Type = PooledConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<PooledConnection, RedisError> {
        let conn = match &self.creator {
            Creator::Direct(manager) => Handle::Server(manager.create().await?),
            #[cfg(feature = "sentinel")]
            Creator::Sentinel(client, config) => {
                Handle::Server(client.lock().await.get_async_connection_with_config(config).await?)
            }
            #[cfg(feature = "cluster")]
            Creator::Cluster(client) => Handle::Cluster(client.get_async_connection().await?),
        };
        Ok(PooledConnection { conn, broken: Arc::new(AtomicBool::new(false)) })
    }

    async fn recycle(&self, conn: &mut PooledConnection, _: &Metrics) -> RecycleResult<RedisError> {
        if conn.broken.load(Relaxed) { Err(RecycleError::message("the connection failed a command")) } else { Ok(()) }
    }
}

/// Deadlines applied to Redis work.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadlines {
    /// Waiting for a pooled connection, including connecting a new one.
    pub connect: Duration,
    /// One command, from send to reply.
    pub command: Duration,
}

pub(crate) struct Connections {
    pool: managed::Pool<RedisManager>,
    /// Connections checked out of the pool and kept: calls clone a handle
    /// from one of them, round robin, without touching the pool.
    kept: Box<[RwLock<Option<managed::Object<RedisManager>>>]>,
    /// One refill per place at a time: a second caller asking the pool too
    /// would wait for the permit the first one's new connection takes.
    refills: Box<[tokio::sync::Mutex<()>]>,
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

/// A connection handle for one call; reports failures that break it.
pub(crate) struct Conn {
    conn: Handle,
    broken: Arc<AtomicBool>,
    max_reply_string: usize,
}

/// What a reply's string longer than the cap is replaced with: no entry
/// parses from it, so the flow counts a decode error and computes.
pub(crate) const LONG_REPLY: &[u8] = b"(a reply string over max_value_bytes plus header, not read)";

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
        let places = (0..kept).map(|_| RwLock::new(None)).collect();
        let refills = (0..kept).map(|_| tokio::sync::Mutex::new(())).collect();
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
            Err(place) => (self.checkout_boxed(place).await?, true, place),
        };
        match self.command(&op, conn).await {
            // A kept connection can have died quietly (a server restart, a
            // CLIENT KILL) and only say so now: try once on a fresh one
            // rather than fail the call, or the breaker's probe.
            Err(Fault::Connection(_)) if !fresh => {
                let conn = self.checkout_boxed(place).await?;
                self.command(&op, conn).await
            }
            result => result,
        }
    }

    /// [`checkout`](Self::checkout), boxed as a trait object: the pool's
    /// checkout future is large and rare, and as a `dyn` it also ends the
    /// compiler's `Send` checks of every caller's future here, instead of
    /// deep inside the pool's connect path, past the default recursion
    /// limit of the caller's crate.
    fn checkout_boxed(&self, place: usize) -> std::pin::Pin<Box<dyn Future<Output = Result<Conn, Fault>> + Send + '_>> {
        Box::pin(self.checkout(place))
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

impl Connections {
    /// A handle on a kept, healthy connection and its place, without
    /// waiting; or the index of the place to fill.
    fn kept_connection(&self) -> Result<(Conn, usize), usize> {
        let index = self.next_kept.fetch_add(1, Relaxed) % self.kept.len();
        let Ok(place) = self.kept[index].read() else { return Err(index) };
        match place.as_ref() {
            Some(pooled) if !pooled.broken.load(Relaxed) => Ok((self.handle(pooled), index)),
            _ => Err(index),
        }
    }

    /// Fills an empty or broken place from the pool, within the connect
    /// deadline; or, when another caller refilled it meanwhile, uses that.
    async fn checkout(&self, index: usize) -> Result<Conn, Fault> {
        match tokio::time::timeout(self.deadlines.connect, self.refill(index)).await {
            Err(_) => Err(Fault::Timeout),
            Ok(result) => result,
        }
    }

    async fn refill(&self, index: usize) -> Result<Conn, Fault> {
        let _refilling = self.refills[index].lock().await;
        if let Some(conn) = self.healthy(index) {
            return Ok(conn);
        }
        self.retire(index);
        let pooled = match self.pool.get().await {
            Ok(pooled) => pooled,
            Err(managed::PoolError::Backend(e)) if refused_credentials(&e) => {
                return Err(Fault::Connection(format!(
                    "Redis refused the credentials: check the password or ACL user in the URL ({e})"
                )));
            }
            Err(e) => return Err(Fault::Connection(e.to_string())),
        };
        let conn = self.handle(&pooled);
        if let Ok(mut place) = self.kept[index].write() {
            // Empty: this refill retired what was there, and holds the
            // place's refill lock.
            *place = Some(pooled);
        }
        Ok(conn)
    }

    /// The place's connection, if it is there and healthy.
    fn healthy(&self, index: usize) -> Option<Conn> {
        let place = self.kept[index].read().ok()?;
        let pooled = place.as_ref().filter(|pooled| !pooled.broken.load(Relaxed))?;
        Some(self.handle(pooled))
    }

    /// Takes the place's broken connection out of the pool, freeing its
    /// permit for the replacement. The socket closes as the last call
    /// still using it lets go.
    fn retire(&self, index: usize) {
        let broken = match self.kept[index].write() {
            Ok(mut place) => place.take_if(|kept| kept.broken.load(Relaxed)),
            Err(_) => None,
        };
        if let Some(broken) = broken {
            drop(managed::Object::take(broken));
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

/// How long a connection may sit idle before the kernel checks on its
/// peer, then how often, and how many times, before it gives up: a dead
/// peer is noticed in about 25 s instead of hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
#[cfg(any(target_os = "linux", target_os = "android", target_os = "macos", target_os = "ios", target_os = "freebsd"))]
const KEEPALIVE_RETRIES: u32 = 3;
/// How long sent data may stay unacknowledged before the kernel closes the
/// socket (Linux): without it, a peer that vanished mid-request is retried
/// for about 15 minutes.
#[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
const UNACKNOWLEDGED_FOR: Duration = Duration::from_secs(30);

/// TCP settings for every connection the cache makes: keepalive on.
pub(crate) fn tcp_settings(base: &redis::io::tcp::TcpSettings) -> redis::io::tcp::TcpSettings {
    let keepalive =
        redis::io::tcp::socket2::TcpKeepalive::new().with_time(KEEPALIVE_IDLE).with_interval(KEEPALIVE_INTERVAL);
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "ios",
        target_os = "freebsd"
    ))]
    let keepalive = keepalive.with_retries(KEEPALIVE_RETRIES);
    let settings = base.clone().set_keepalive(keepalive);
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let settings = settings.set_user_timeout(UNACKNOWLEDGED_FOR);
    settings
}

fn with_keepalive(info: redis::ConnectionInfo) -> redis::ConnectionInfo {
    let settings = tcp_settings(info.tcp_settings());
    info.set_tcp_settings(settings)
}

impl Connections {
    fn handle(&self, pooled: &PooledConnection) -> Conn {
        Conn { conn: pooled.conn.clone(), broken: pooled.broken.clone(), max_reply_string: self.max_reply_string }
    }
}

/// `value` with every string longer than `max` replaced by [`LONG_REPLY`],
/// so that no entry longer than the cache stores is decoded or kept.
/// redis-rs has read the string by then: Redis's `proto-max-bulk-len`
/// (512 MB by default) bounds that buffer, and it is freed here.
fn cap_reply(value: redis::Value, max: usize) -> redis::Value {
    match value {
        redis::Value::BulkString(bytes) if bytes.len() > max => {
            crate::warnings::PROCESS_WARNINGS.warn(
                crate::warnings::Cause::LongReply,
                format_args!(
                    "Redis returned a value of {} bytes, over max_value_bytes plus header ({max}): not decoded",
                    bytes.len()
                ),
            );
            redis::Value::BulkString(LONG_REPLY.to_vec())
        }
        redis::Value::Array(values) => redis::Value::Array(values.into_iter().map(|v| cap_reply(v, max)).collect()),
        other => other,
    }
}

/// A wrong password or ACL user. A cluster connection reports it inside
/// its error for the initial connections, whose kind is I/O.
fn refused_credentials(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || (e.is_io_error() && e.to_string().contains("AuthenticationFailed"))
}

/// Errors a cluster connection gives when its place map points at a node
/// that is gone (a killed master, replaced by its replica): redis-rs drops
/// the part of a multi-slot command meant for a node it has no connection
/// to, and reports the mismatch, or finds no connection at all. It does not
/// learn the new map from those, so the connection is replaced: a new one
/// asks the nodes for the current map.
fn stale_cluster_map(e: &RedisError) -> bool {
    matches!(e.kind(), redis::ErrorKind::Client | redis::ErrorKind::ClusterConnectionNotFound)
}

impl Source {
    fn is_cluster(&self) -> bool {
        #[cfg(feature = "cluster")]
        if let Source::Cluster(_) = self {
            return true;
        }
        false
    }
}

impl Conn {
    pub(crate) async fn query<T: FromRedisValue>(self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        let value: redis::Value = match self.conn {
            Handle::Server(mut conn) => cmd.query_async(&mut conn).await?,
            #[cfg(feature = "cluster")]
            Handle::Cluster(mut conn) => cmd.query_async(&mut conn).await?,
        };
        Ok(T::from_redis_value(cap_reply(value, self.max_reply_string))?)
    }

    /// `cmd` sent to `node` right after `ASKING`, in one write, so that no
    /// other command on the shared connection can take the `ASKING` first
    /// (redis-rs sends the two separately). On a single server, just `cmd`.
    pub(crate) async fn query_asking<T: FromRedisValue>(
        self,
        node: &(String, u16),
        cmd: &redis::Cmd,
    ) -> Result<T, RedisError> {
        match self.conn {
            Handle::Server(conn) => {
                let _ = node;
                Conn { conn: Handle::Server(conn), ..self }.query(cmd).await
            }
            #[cfg(feature = "cluster")]
            Handle::Cluster(mut conn) => {
                let mut pipeline = redis::pipe();
                pipeline.cmd("ASKING").add_command(cmd.clone());
                let route =
                    redis::cluster_routing::SingleNodeRoutingInfo::ByAddress { host: node.0.clone(), port: node.1 };
                let reply = conn.route_pipeline(pipeline, 1, 1, route).await?.pop();
                let value = reply.ok_or_else(|| RedisError::from((redis::ErrorKind::Client, "no reply")))?;
                Ok(T::from_redis_value(cap_reply(value.extract_error()?, self.max_reply_string))?)
            }
        }
    }

    pub(crate) async fn invoke<T: FromRedisValue>(
        self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, RedisError> {
        let value: redis::Value = match self.conn {
            Handle::Server(mut conn) => invocation.invoke_async(&mut conn).await?,
            #[cfg(feature = "cluster")]
            Handle::Cluster(mut conn) => invocation.invoke_async(&mut conn).await?,
        };
        Ok(T::from_redis_value(cap_reply(value, self.max_reply_string))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    #[test]
    fn reply_strings_over_the_cap_are_replaced() {
        let reply = Value::Array(vec![
            Value::BulkString(vec![b'x'; 11]),
            Value::Nil,
            Value::BulkString(vec![b'y'; 10]),
            Value::Array(vec![Value::BulkString(vec![b'z'; 12])]),
        ]);
        let capped = cap_reply(reply, 10);
        let expected = Value::Array(vec![
            Value::BulkString(LONG_REPLY.to_vec()),
            Value::Nil,
            Value::BulkString(vec![b'y'; 10]),
            Value::Array(vec![Value::BulkString(LONG_REPLY.to_vec())]),
        ]);
        assert_eq!(capped, expected);
    }
}
