//! The Lua scripts, each one atomic command. Every key a script touches is
//! passed in `KEYS`; an entry, its lock and its prefix's version share a
//! hash tag. redis-rs sends them as `EVALSHA` and falls back to `EVAL` after
//! `NOSCRIPT` (a restarted or flushed server).
//!
//! On Redis Cluster a script may only touch one slot, and a tag's version
//! lives in the tag's slot. There the caller reads tag versions itself and
//! passes them as *pinned* versions after the others: the script binds the
//! entry to them without reading them. An entry bound to a tag version that
//! changed meanwhile is never served, because every hit compares the
//! entry's versions with the ones it reads.
//!
//! Namespace versions are compared as the strings Redis stores: Lua numbers
//! are doubles, so nothing here does arithmetic on them.

use std::sync::LazyLock;

/// Reads the fresh-until time from an entry whose header up to the
/// versions is `head`; `nil` for an entry without one.
const FRESH_UNTIL: &str = r"
local function fresh_until(entry, head)
  return tonumber(string.match(entry, '^%d+,(%d+)|', #head + 1))
end
";

fn with_fresh_until(body: &str) -> redis::Script {
    redis::Script::new(&format!("{FRESH_UNTIL}{body}"))
}

/// Stores an entry, bound to the versions its computation observed, if
/// they are all still current; and releases the caller's stampede lock.
///
/// A `fill` (a miss) leaves alone a fresh entry already bound to the
/// current versions: someone stored a value at least as fresh meanwhile,
/// perhaps a write-through. A `put` (a refresh) overwrites, and tells other
/// processes' local tiers to drop their copy. Anything else at the key (a
/// stale or foreign value, another Redis type) is overwritten.
///
/// KEYS: entry, lock, then the version keys read here (every namespace's,
/// or on a cluster the prefix's).
/// ARGV: ttl ms, header up to the versions, payload, 'fill' or 'put', lock
/// token ('' for none), times field, now ms, channel ('' for none),
/// message, then the observed versions: one per version key, then the
/// pinned ones.
/// Returns 1 stored, 0 a version changed, 2 a current entry was there.
pub(crate) static STORE: LazyLock<redis::Script> = LazyLock::new(|| {
    with_fresh_until(
        r"
if ARGV[5] ~= '' and redis.call('GET', KEYS[2]) == ARGV[5] then redis.call('DEL', KEYS[2]) end
local versions = {}
for i = 3, #KEYS do
  local current = redis.call('GET', KEYS[i])
  if current ~= ARGV[7 + i] then return 0 end
  versions[i - 2] = current
end
for i = #KEYS + 8, #ARGV do versions[#versions + 1] = ARGV[i] end
local head = ARGV[2] .. table.concat(versions, ',') .. '|'
if ARGV[4] == 'fill' then
  local existing = redis.pcall('GET', KEYS[1])
  if type(existing) == 'string' and string.sub(existing, 1, #head) == head then
    local until_ms = fresh_until(existing, head)
    if until_ms and until_ms > tonumber(ARGV[7]) then return 2 end
  end
end
redis.call('SET', KEYS[1], head .. ARGV[6] .. '|' .. ARGV[3], 'PX', ARGV[1])
if ARGV[8] ~= '' then redis.pcall('PUBLISH', ARGV[8], ARGV[9]) end
return 1
",
    )
});

/// Gives namespaces that have no version yet a random one, and returns the
/// versions of all KEYS. A namespace gets its version before anything is
/// computed under it, so every computation is bound to a version it
/// observed; and a version key that was evicted or flushed comes back as a
/// value no old entry is bound to.
///
/// KEYS: version keys. ARGV: one fresh seed per key.
pub(crate) static SEED_VERSIONS: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i], 'NX') end
return redis.call('MGET', unpack(KEYS))
",
    )
});

/// The stampede lock, and the re-check that makes it safe: returns
/// `{'hit', entry}` when an entry bound to the current versions and fresh
/// past `min_fresh` exists now (someone stored it since our read), else
/// tries `SET lock token NX PX` and returns `{'lead', versions...}` on
/// success, `{'wait'}` otherwise. Waiters in other processes call it again
/// with backoff, so it is also their poll. Seeds missing versions as
/// [`SEED_VERSIONS`] does.
///
/// A reader passes now as `min_fresh`; a refresh-ahead passes the fresh-until
/// time of the entry it wants to replace, so only a newer entry stops it.
///
/// KEYS: entry, lock, then the version keys read here (as for [`STORE`]).
/// ARGV: header up to the versions, token, lock ttl ms, min_fresh ms, one
/// fresh seed per version key, then the pinned versions.
pub(crate) static LOCK: LazyLock<redis::Script> = LazyLock::new(|| {
    with_fresh_until(
        r"
local versions = {}
for i = 3, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if not v then
    v = ARGV[i + 2]
    redis.call('SET', KEYS[i], v)
  end
  versions[i - 2] = v
end
for i = #KEYS + 3, #ARGV do versions[#versions + 1] = ARGV[i] end
local head = ARGV[1] .. table.concat(versions, ',') .. '|'
local entry = redis.pcall('GET', KEYS[1])
if type(entry) == 'string' and string.sub(entry, 1, #head) == head then
  local until_ms = fresh_until(entry, head)
  if until_ms and until_ms > tonumber(ARGV[4]) then return {'hit', entry} end
end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then
  return {'lead', unpack(versions)}
end
return {'wait'}
",
    )
});

/// Releases a stampede lock only if the caller still holds it: a plain DEL
/// could delete a lock that expired and was taken by someone else.
///
/// KEYS: lock. ARGV: token.
pub(crate) static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// Bumps a namespace's version and announces it to local tiers; a missing
/// version starts from a random seed rather than from 1, which an evicted
/// version key may have had. Returns the version as Redis's string: Lua
/// numbers are doubles. The announcement is best effort (`pcall`): an ACL
/// user without channel rights still invalidates.
///
/// KEYS: version key. ARGV: fresh seed, channel, message.
pub(crate) static INVALIDATE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('INCR', KEYS[1])
redis.pcall('PUBLISH', ARGV[2], ARGV[3])
return redis.call('GET', KEYS[1])
",
    )
});

/// Deletes one entry and announces it to local tiers. Returns how many
/// keys were deleted.
///
/// KEYS: entry. ARGV: channel, message.
pub(crate) static FORGET: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local deleted = redis.call('DEL', KEYS[1])
redis.pcall('PUBLISH', ARGV[1], ARGV[2])
return deleted
",
    )
});

/// A random starting version: far from 0, and below 2^52 so that no tool
/// that reads versions as doubles (Lua, JSON) ever rounds one.
pub(crate) fn fresh_seed() -> u64 {
    rand::random_range((1u64 << 32)..(1u64 << 52))
}
