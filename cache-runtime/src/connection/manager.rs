//! Where connections come from (a server, Sentinel, a cluster), the
//! handle a call gets, and what every connection is set up with.

use super::Connections;
use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use redis::aio::MultiplexedConnection;
use redis::{FromRedisValue, RedisError};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

pub(crate) struct RedisManager {
    pub(super) creator: Creator,
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

pub(super) enum Creator {
    Direct(deadpool_redis::Manager),
    #[cfg(feature = "sentinel")]
    Sentinel(tokio::sync::Mutex<redis::sentinel::SentinelClient>, redis::AsyncConnectionConfig),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster::ClusterClient),
}

/// One server's multiplexed connection, or a cluster connection (itself
/// multiplexed, with a connection to each node it needs).
#[derive(Clone)]
pub(super) enum Handle {
    Server(MultiplexedConnection),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

pub(crate) struct PooledConnection {
    pub(super) conn: Handle,
    pub(super) broken: Arc<AtomicBool>,
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

/// A connection handle for one call; reports failures that break it.
pub(crate) struct Conn {
    pub(super) conn: Handle,
    pub(super) broken: Arc<AtomicBool>,
    pub(super) max_reply_string: usize,
}

/// What a reply's string longer than the cap is replaced with: no entry
/// parses from it, so the flow counts a decode error and computes.
pub(crate) const LONG_REPLY: &[u8] = b"(a reply string over max_value_bytes plus header, not read)";

/// How long a connection may sit idle before the kernel checks on its
/// peer, then how often, and how many times, before it gives up: a dead
/// peer is noticed in about 25 s instead of hours.
pub(super) const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
pub(super) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
#[cfg(any(target_os = "linux", target_os = "android", target_os = "macos", target_os = "ios", target_os = "freebsd"))]
pub(super) const KEEPALIVE_RETRIES: u32 = 3;
/// How long sent data may stay unacknowledged before the kernel closes the
/// socket (Linux): without it, a peer that vanished mid-request is retried
/// for about 15 minutes.
#[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
pub(super) const UNACKNOWLEDGED_FOR: Duration = Duration::from_secs(30);

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

pub(super) fn with_keepalive(info: redis::ConnectionInfo) -> redis::ConnectionInfo {
    let settings = tcp_settings(info.tcp_settings());
    info.set_tcp_settings(settings)
}

impl Connections {
    pub(super) fn handle(&self, pooled: &PooledConnection) -> Conn {
        Conn { conn: pooled.conn.clone(), broken: pooled.broken.clone(), max_reply_string: self.max_reply_string }
    }
}

/// `value` with every string longer than `max` replaced by [`LONG_REPLY`],
/// so that no entry longer than the cache stores is decoded or kept.
/// redis-rs has read the string by then: Redis's `proto-max-bulk-len`
/// (512 MB by default) bounds that buffer, and it is freed here.
pub(super) fn cap_reply(value: redis::Value, max: usize) -> redis::Value {
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
pub(super) fn refused_credentials(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || (e.is_io_error() && e.to_string().contains("AuthenticationFailed"))
}

/// Errors a cluster connection gives when its slot map points at a node
/// that is gone (a killed master, replaced by its replica): redis-rs drops
/// the part of a multi-slot command meant for a node it has no connection
/// to, and reports the mismatch, or finds no connection at all. It does not
/// learn the new map from those, so the connection is replaced: a new one
/// asks the nodes for the current map.
pub(super) fn stale_cluster_map(e: &RedisError) -> bool {
    matches!(e.kind(), redis::ErrorKind::Client | redis::ErrorKind::ClusterConnectionNotFound)
}

impl Source {
    pub(super) fn is_cluster(&self) -> bool {
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

    /// `cmd` on one node of a cluster, by address (`SCAN` walks one
    /// node's keys); on a single server, or with no node, as `query`.
    pub(crate) async fn query_on<T: FromRedisValue>(
        self,
        node: Option<&(String, u16)>,
        cmd: &redis::Cmd,
    ) -> Result<T, RedisError> {
        match (self.conn, node) {
            #[cfg(feature = "cluster")]
            (Handle::Cluster(mut conn), Some((host, port))) => {
                let route = redis::cluster_routing::RoutingInfo::SingleNode(
                    redis::cluster_routing::SingleNodeRoutingInfo::ByAddress { host: host.clone(), port: *port },
                );
                let value = conn.route_command(cmd.clone(), route).await?;
                Ok(T::from_redis_value(cap_reply(value, self.max_reply_string))?)
            }
            (conn, _) => Conn { conn, ..self }.query(cmd).await,
        }
    }

    /// Sends `pipeline` in one write and reads its replies. Built with
    /// `ignore_errors`, a command's error is its reply
    /// (`Value::ServerError`) and does not hide the others'.
    pub(crate) async fn pipeline(self, pipeline: &redis::Pipeline) -> Result<Vec<redis::Value>, RedisError> {
        let values: Vec<redis::Value> = match self.conn {
            Handle::Server(mut conn) => pipeline.query_async(&mut conn).await?,
            #[cfg(feature = "cluster")]
            Handle::Cluster(mut conn) => pipeline.query_async(&mut conn).await?,
        };
        Ok(values.into_iter().map(|value| cap_reply(value, self.max_reply_string)).collect())
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
