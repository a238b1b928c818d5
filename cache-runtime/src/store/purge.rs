//! Redis's side of `Cache::purge`: which nodes hold keys, one `SCAN` step
//! on one of them, and the script that reclaims the entries of one
//! namespace that no reader can be served any more.
//!
//! Only entries bound to a version that is no longer current are
//! reclaimed: after `Cache::clear` that is every entry. A reclaimed entry
//! is replaced by a small tombstone that lives as long as the entry had
//! left (at least a lock's life), never deleted: if the entry was live
//! after all (written by an older release, which binds entries to fewer
//! versions, or misjudged on a cluster after a version key was evicted), a
//! computation that observed the key empty before that entry was written
//! must not find it empty again and store its older value. Version keys,
//! locks and tombstones are never touched: a version key deleted and
//! seeded again, a lock taken twice, a forgotten value stored again.

use super::Redis;
use crate::error::Fault;
use crate::keys::{CACHE_WIDE, version_key};
use std::sync::LazyLock;

/// A node to scan: a cluster master's address, or `None` for the server.
pub(crate) type Node = Option<(String, u16)>;

impl Redis {
    /// Every node that holds keys: each master of a cluster, or the server.
    pub(crate) async fn nodes_to_scan(&self) -> Result<Vec<Node>, Fault> {
        if !self.connections.is_cluster() {
            return Ok(vec![None]);
        }
        let mut slots = redis::cmd("CLUSTER");
        slots.arg("SLOTS");
        let reply = self.connections.run(|conn| conn.query::<redis::Value>(&slots)).await?;
        // The host a node announcing none means: the one we were given.
        let asked = self.channel_nodes.first().map(|node| match node.get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(host, _) | redis::ConnectionAddr::TcpTls { host, .. } => host.clone(),
            _ => String::new(),
        });
        let masters = masters(&reply, asked.as_deref().unwrap_or_default())?;
        if masters.is_empty() {
            return Err(Fault::Server("CLUSTER SLOTS named no master".to_owned()));
        }
        Ok(masters.into_iter().map(Some).collect())
    }

    /// One `SCAN` step on `node`: the next cursor (0 when done) and the
    /// keys matching `pattern`. `count` bounds the work of the step.
    pub(crate) async fn scan(
        &self,
        node: &Node,
        cursor: u64,
        pattern: &str,
        count: u32,
    ) -> Result<(u64, Vec<String>), Fault> {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(count);
        let (next, keys) =
            self.connections.run(|conn| conn.query_on::<(u64, Vec<Vec<u8>>)>(node.as_ref(), &scan)).await?;
        // A key that is not UTF-8 is not one of ours.
        Ok((next, keys.into_iter().filter_map(|key| String::from_utf8(key).ok()).collect()))
    }

    /// Replaces with tombstones those of `entries`, keys of `namespace`'s
    /// entries, that are bound to a version no longer current; returns how
    /// many. A tombstone lives what its entry had left, and at least
    /// `min_ttl`. On a cluster the cache-wide version lives in another slot: it
    /// is read first and passed in, and only entries bound to an older one
    /// (versions grow) are deleted, so that a clear during the batch does
    /// not make entries stored after it look dead.
    pub(crate) async fn delete_dead(
        &self,
        key_prefix: &str,
        namespace: &str,
        entries: &[String],
        min_ttl: std::time::Duration,
    ) -> Result<u64, Fault> {
        let prefix_version = version_key(key_prefix, namespace);
        let cache_wide = version_key(key_prefix, CACHE_WIDE);
        let mut invocation = PURGE.prepare_invoke();
        invocation.key(&prefix_version);
        if self.connections.is_cluster() {
            let mut get = redis::cmd("GET");
            get.arg(&cache_wide);
            let pinned = self.connections.run(|conn| conn.query::<Option<String>>(&get)).await?;
            invocation.arg(1).arg(pinned.unwrap_or_default());
        } else {
            invocation.key(&cache_wide).arg(2).arg("");
        }
        invocation.arg(super::tombstone()).arg(super::remote::millis(min_ttl).max(1));
        invocation.key(entries);
        self.connections.run(|conn| conn.invoke::<u64>(&invocation)).await
    }
}

/// KEYS: the namespace's version key, the cache-wide version key (not on
/// a cluster), then entries. ARGV: how many version keys come first (1 or
/// 2), the cache-wide version read by the caller ('' for none; on a
/// cluster). Reads only the head of each value: a header is short, a value
/// may not be. Deletes an entry whose first version (its prefix's) is not
/// the current one, or whose last (the cache-wide one) is not current
/// (read here) or is older than the one passed in. Anything that does not
/// parse as an entry (a tombstone, another program's value) is kept.
/// Versions are below 2^53 (see `fresh_seed`), so Lua compares them
/// exactly as numbers. Returns the count deleted.
static PURGE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local reads, pinned, tombstone, min_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local prefix_version = redis.call('GET', KEYS[1])
local cache_wide = reads == 2 and redis.call('GET', KEYS[2])
local deleted = 0
for i = reads + 1, #KEYS do
  local head = redis.pcall('GETRANGE', KEYS[i], 0, 1023)
  local versions = type(head) == 'string' and string.match(head, '^RC%d+|[^|]*|([^|]*)|')
  if versions then
    local first, last = string.match(versions, '^[^,]*'), string.match(versions, '[^,]*$')
    local dead = first ~= prefix_version
    if reads == 2 then
      dead = dead or last ~= cache_wide
    elseif pinned and tonumber(last) then
      dead = dead or tonumber(last) < pinned
    end
    if dead then
      local ttl = math.max(redis.call('PTTL', KEYS[i]), min_ttl)
      redis.call('SET', KEYS[i], tombstone .. i, 'PX', ttl)
      deleted = deleted + 1
    end
  end
end
return deleted
",
    )
});

/// The masters named in a `CLUSTER SLOTS` reply, each once, addressed the
/// way redis-rs addresses them (its routing by address must find them): an
/// empty, null or wildcard endpoint means "the host you asked", which is
/// `asked` (a cluster behind a load balancer announces only ports); `?`
/// means a node whose announced hostname is missing, which no client can
/// reach: an error, rather than a purge that skips its keys and says done.
fn masters(reply: &redis::Value, asked: &str) -> Result<Vec<(String, u16)>, Fault> {
    use redis::Value;
    let mut masters: Vec<(String, u16)> = Vec::new();
    let Value::Array(ranges) = reply else { return Ok(masters) };
    for range in ranges {
        let Value::Array(parts) = range else { continue };
        let Some(Value::Array(master)) = parts.get(2) else { continue };
        let host = match master.first() {
            Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
            Some(Value::SimpleString(host)) => host.clone(),
            Some(Value::Nil) => String::new(),
            _ => continue,
        };
        let Some(Value::Int(port)) = master.get(1) else { continue };
        let Ok(port) = u16::try_from(*port) else { continue };
        let host = match host.as_str() {
            "" | "0.0.0.0" | "::" => asked.to_owned(),
            "?" => {
                return Err(Fault::Server(format!(
                    "the cluster master on port {port} announces no endpoint ('?'): set its \
                     cluster-announce-hostname, or cluster-preferred-endpoint-type to ip"
                )));
            }
            _ => host,
        };
        if !masters.iter().any(|(h, p)| *h == host && *p == port) {
            masters.push((host, port));
        }
    }
    Ok(masters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    #[test]
    fn masters_are_read_from_cluster_slots() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![Value::BulkString(host.into()), Value::Int(port), Value::BulkString(b"id".to_vec())])
        };
        let range =
            |start, end, master, replica| Value::Array(vec![Value::Int(start), Value::Int(end), master, replica]);
        let reply = Value::Array(vec![
            range(0, 5000, node("10.0.0.1", 7000), node("10.0.0.4", 7003)),
            range(5001, 10000, node("10.0.0.2", 7001), node("10.0.0.5", 7004)),
            range(10001, 16383, node("10.0.0.1", 7000), node("10.0.0.6", 7005)),
            Value::Nil,
        ]);
        let found = masters(&reply, "seed").expect("masters");
        assert_eq!(found, [("10.0.0.1".to_owned(), 7000), ("10.0.0.2".to_owned(), 7001)]);
        assert!(masters(&Value::Nil, "seed").is_ok_and(|m| m.is_empty()));
    }

    #[test]
    fn an_endpoint_left_to_the_client_is_the_host_asked() {
        let node =
            |host: Value, port: i64| Value::Array(vec![host, Value::Int(port), Value::BulkString(b"id".to_vec())]);
        let range = |start, end, master| Value::Array(vec![Value::Int(start), Value::Int(end), master]);
        let reply = Value::Array(vec![
            range(0, 5000, node(Value::Nil, 7000)),
            range(5001, 10000, node(Value::BulkString(Vec::new()), 7001)),
            range(10001, 16383, node(Value::BulkString(b"0.0.0.0".to_vec()), 7002)),
        ]);
        let found = masters(&reply, "lb.example").expect("masters");
        let at = |port| ("lb.example".to_owned(), port);
        assert_eq!(found, [at(7000), at(7001), at(7002)]);
        let unknown = Value::Array(vec![range(0, 16383, node(Value::BulkString(b"?".to_vec()), 7000))]);
        assert!(masters(&unknown, "lb.example").is_err(), "a master no client can reach is not skipped");
    }
}
