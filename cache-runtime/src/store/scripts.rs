//! The Lua scripts, each one atomic command, with typed arguments and
//! typed replies. Each script's arguments are written down once: the
//! `*Args` struct's fields, in order, are the script's `ARGV`, and the Lua
//! names them in its first line in the same order. Every key a script
//! touches is passed in `KEYS`; an entry, its lock and its prefix's version
//! share a hash tag. redis-rs sends them as `EVALSHA` and falls back to
//! `EVAL` after `NOSCRIPT` (a restarted or flushed server).
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

/// Reads the fresh-until time from an entry of the codec whose head is
/// `head` (`RC2|b`: any packing letter may follow, `codec.rs`) bound to
/// exactly `bound` (the versions joined by ',' then '|'); `nil` for any
/// other entry.
/// And the digest of what a key holds: the SHA-1 of a string, '' for
/// anything else, as [`digest`] computes it from what `MGET` returned.
const HELPERS: &str = r"
local function fresh_until(entry, head, bound)
  if string.sub(entry, 1, #head) ~= head then return nil end
  local at = #head + 1
  local packing = string.sub(entry, at, at)
  if packing ~= '|' then
    -- The letters `compress.rs` writes; an entry of another packing is
    -- not a hit here, so a caller never skips the lock for it.
    if packing ~= 'l' and packing ~= 'z' then return nil end
    at = at + 1
  end
  if string.sub(entry, at, at + #bound) ~= '|' .. bound then return nil end
  return tonumber(string.match(entry, '^%d+,(%d+)|', at + #bound + 1))
end
local function digest(key)
  local value = redis.pcall('GET', key)
  if type(value) ~= 'string' then return '' end
  return redis.sha1hex(value)
end
";

fn with_helpers(body: &str) -> redis::Script {
    redis::Script::new(&format!("{HELPERS}{body}"))
}

/// What a store expects at the entry's key: what a caller observed there
/// before computing, so that a write in between (a write-through, a
/// forget's tombstone, another caller's store) is never overwritten with a
/// value computed before it. `''` for nothing (`MGET`'s nil), the SHA-1 of
/// the bytes otherwise.
pub(crate) fn digest(entry: Option<&[u8]>) -> String {
    entry.map(|bytes| sha1_smol::Sha1::from(bytes).digest().to_string()).unwrap_or_default()
}

/// [`STORE`]'s arguments.
pub(crate) struct StoreArgs<'a> {
    pub entry: &'a str,
    /// The stampede lock to release; with an empty `token`, none.
    pub lock: &'a str,
    /// The version keys the script reads (every namespace's, or on a
    /// cluster the prefix's).
    pub version_keys: &'a [String],
    pub ttl_ms: u64,
    /// The header up to the versions (`Codec::head`).
    pub head: &'a [u8],
    pub payload: &'a [u8],
    /// The digest the entry must still have ([`digest`]).
    pub expect: &'a str,
    pub token: &'a str,
    /// `<stored>,<fresh until>`.
    pub times: &'a str,
    pub now_ms: u64,
    /// Where to announce the overwrite ('' for nowhere), and what.
    pub channel: &'a str,
    pub message: &'a str,
    /// One per version key, then the pinned ones.
    pub observed: &'a [Vec<u8>],
}

/// What [`STORE`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreReply {
    Stored,
    /// A namespace was invalidated since the versions were observed.
    VersionChanged,
    /// The entry is no longer the one observed: someone wrote it since.
    Superseded,
}

impl StoreArgs<'_> {
    /// The call as one command of a pipeline (`EVALSHA`; the pipeline
    /// loads the script on `NOSCRIPT`).
    pub(crate) fn command(&self) -> redis::Cmd {
        let mut parts = Parts::default();
        self.write(&mut parts);
        parts.evalsha(&STORE)
    }

    /// The keys and arguments, in the script's order.
    fn write(&self, to: &mut impl ScriptCall) {
        to.key(self.entry)
            .key(self.lock)
            .key(self.version_keys)
            .arg(self.ttl_ms)
            .arg(self.head)
            .arg(self.payload)
            .arg(self.expect)
            .arg(self.token)
            .arg(self.times)
            .arg(self.now_ms)
            .arg(self.channel)
            .arg(self.message);
        for version in self.observed {
            to.arg(&version[..]);
        }
    }
}

impl StoreReply {
    pub(crate) fn parse(reply: i64) -> Self {
        match reply {
            1 => StoreReply::Stored,
            2 => StoreReply::Superseded,
            _ => StoreReply::VersionChanged,
        }
    }
}

/// Stores an entry, bound to the versions its computation observed, if
/// they are all still current and the entry is still what the caller
/// observed; and releases the
/// caller's stampede lock. With a channel, tells other processes' local
/// tiers to drop their copy.
///
/// KEYS: entry, lock, version keys. ARGV: [`StoreArgs`].
/// Returns 1 stored, 0 a version changed, 2 the entry changed.
///
/// A miss that found its key empty stores without it (`fill.rs`), writing
/// the entry `codec::entry_bytes` builds: the two must stay byte for byte
/// the same (`tests/miss_path.rs` compares them).
static STORE: LazyLock<redis::Script> = LazyLock::new(|| with_helpers(STORE_BODY));
const STORE_BODY: &str = r"
local ttl_ms, head, payload, expect, token, times, now_ms, channel, message = unpack(ARGV, 1, 9)
if token ~= '' and redis.call('GET', KEYS[2]) == token then redis.call('DEL', KEYS[2]) end
local versions = {}
for i = 3, #KEYS do
  local current = redis.call('GET', KEYS[i])
  if current ~= ARGV[7 + i] then return 0 end
  versions[i - 2] = current
end
for i = #KEYS + 8, #ARGV do versions[#versions + 1] = ARGV[i] end
head = head .. table.concat(versions, ',') .. '|'
if digest(KEYS[1]) ~= expect then return 2 end
redis.call('SET', KEYS[1], head .. times .. '|' .. payload, 'PX', ttl_ms)
if channel ~= '' then redis.pcall('PUBLISH', channel, message) end
return 1
";

/// [`LOCK`]'s arguments.
pub(crate) struct LockArgs<'a> {
    pub entry: &'a str,
    pub lock: &'a str,
    /// As for [`StoreArgs::version_keys`].
    pub version_keys: &'a [String],
    /// The codec's head (`Codec::lock_head`): an entry of any packing hits.
    pub head: &'a [u8],
    pub token: &'a str,
    pub lock_ttl_ms: u64,
    /// An entry fresh past this time answers as a hit.
    pub min_fresh_ms: u64,
    /// Tag versions read by the caller, on a cluster.
    pub pinned: &'a [Vec<u8>],
}

/// What [`LOCK`] answered.
#[derive(Debug)]
pub(crate) enum LockReply {
    /// An entry bound to the current versions is there now.
    Hit(Vec<u8>),
    /// We hold the lock; the entry's digest now, and the current versions
    /// (read, then pinned).
    Lead { observed: String, versions: Vec<Vec<u8>> },
    /// Someone else holds it.
    Wait,
}

impl LockArgs<'_> {
    pub(crate) fn invocation(&self) -> redis::ScriptInvocation<'static> {
        let mut invocation = LOCK.prepare_invoke();
        self.write(&mut invocation);
        invocation
    }

    /// The same call as one command of a pipeline (`EVALSHA`).
    pub(crate) fn command(&self) -> redis::Cmd {
        let mut parts = Parts::default();
        self.write(&mut parts);
        parts.evalsha(&LOCK)
    }

    fn write(&self, to: &mut impl ScriptCall) {
        to.key(self.entry)
            .key(self.lock)
            .key(self.version_keys)
            .arg(self.head)
            .arg(self.token)
            .arg(self.lock_ttl_ms)
            .arg(self.min_fresh_ms);
        for _ in self.version_keys {
            to.arg(fresh_seed());
        }
        for version in self.pinned {
            to.arg(&version[..]);
        }
    }
}

impl LockReply {
    /// `None` for a reply of the wrong shape: `versions` is how many a
    /// `lead` must carry.
    pub(crate) fn parse(mut reply: Vec<Vec<u8>>, versions: usize) -> Option<Self> {
        match reply.first()?.as_slice() {
            b"hit" if reply.len() == 2 => Some(LockReply::Hit(reply.swap_remove(1))),
            b"lead" if reply.len() == versions + 2 => {
                let versions = reply.split_off(2);
                let observed = String::from_utf8(reply.swap_remove(1)).ok()?;
                Some(LockReply::Lead { observed, versions })
            }
            b"wait" => Some(LockReply::Wait),
            _ => None,
        }
    }
}

/// The stampede lock, and the re-check that makes it safe: returns
/// `{'hit', entry}` when an entry bound to the current versions and fresh
/// past `min_fresh` exists now (someone stored it since our read), else
/// tries `SET lock token NX PX` and returns `{'lead', digest, versions...}`
/// on success (the entry's digest, which the store then expects),
/// `{'wait'}` otherwise. Waiters in other processes call it again
/// with backoff, so it is also their poll. Seeds missing versions as
/// [`SEED_VERSIONS`] does.
///
/// A reader passes now as `min_fresh`; a refresh-ahead passes the fresh-until
/// time of the entry it wants to replace, so only a newer entry stops it.
///
/// KEYS: entry, lock, version keys. ARGV: [`LockArgs`]: head, token, lock
/// ttl, min fresh, one fresh seed per version key, then the pinned versions.
static LOCK: LazyLock<redis::Script> = LazyLock::new(|| with_helpers(LOCK_BODY));
const LOCK_BODY: &str = r"
local head, token, lock_ttl_ms, min_fresh_ms = unpack(ARGV, 1, 4)
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
local entry = redis.pcall('GET', KEYS[1])
if type(entry) == 'string' then
  local until_ms = fresh_until(entry, head, table.concat(versions, ',') .. '|')
  if until_ms and until_ms > tonumber(min_fresh_ms) then return {'hit', entry} end
end
-- Ours already when an earlier send of this request ran but its reply was
-- lost (a resend on a fresh connection): we lead, rather than wait for
-- our own lock to expire.
if redis.call('SET', KEYS[2], token, 'NX', 'PX', lock_ttl_ms) or redis.call('GET', KEYS[2]) == token then
  return {'lead', digest(KEYS[1]), unpack(versions)}
end
return {'wait'}
";

/// [`CLAIM`]'s arguments: a bulk call's read that also takes the locks of
/// what it misses.
pub(crate) struct ClaimArgs<'a> {
    /// Shared by every item.
    pub version_keys: &'a [String],
    pub entries: &'a [&'a str],
    /// One per entry, in the same order.
    pub locks: &'a [String],
    /// As for [`LockArgs::head`].
    pub head: &'a [u8],
    /// One token for every lock of the call: each lock is its own key.
    pub token: &'a str,
    pub lock_ttl_ms: u64,
}

/// What [`CLAIM`] decided for one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Current as the script judged it: not locked.
    Current,
    /// Not current, and the lock is ours now.
    Taken,
    /// Not current, and someone else holds the lock. Without the script:
    /// someone holds it, whatever the entry, maybe this very request
    /// (its reply lost, sent again), so the caller releases it by token.
    Held,
    /// Not locked: the read did not ask for its lock (`store::claim`).
    Unasked,
    /// Not locked: the server refused the request (memory full, a
    /// replica), unless an earlier send of it took the lock and its reply
    /// was lost; the caller releases it by token.
    Refused,
}

impl ClaimArgs<'_> {
    /// The call as one command of a pipeline (`EVALSHA`).
    pub(crate) fn command(&self) -> redis::Cmd {
        let mut parts = Parts::default();
        parts
            .key(self.version_keys)
            .key(self.entries)
            .key(self.locks)
            .arg(self.head)
            .arg(self.token)
            .arg(self.lock_ttl_ms)
            .arg(self.version_keys.len());
        for _ in self.version_keys {
            parts.arg(fresh_seed());
        }
        parts.evalsha(&CLAIM)
    }
}

impl Claim {
    /// The script's number for an entry; `None` for any other.
    pub(crate) fn parse(number: i64) -> Option<Self> {
        match number {
            0 => Some(Claim::Current),
            1 => Some(Claim::Taken),
            2 => Some(Claim::Held),
            _ => None,
        }
    }
}

/// The stampede locks of a bulk call's misses, sent in one pipeline with
/// the `MGET` of the entries and versions that follows it (`store::claim`):
/// reads the versions (seeding any missing one, as [`LOCK`] does) and the
/// entries, and takes `SET lock token NX PX` for each entry that is absent
/// or not bound to the current versions. Returns one number per entry
/// (numbers, not a string: a reply's strings are capped at an entry's
/// size): 0 current (not locked), 1 taken (or ours already: a resend after
/// a lost reply), 2 held by someone else.
///
/// Cheaper than [`LOCK`]'s test, on purpose: it runs for every entry of a
/// call, hits included. It looks for the versions' text right after the
/// head (one plain `string.find`, no substrings) and not at the entry's
/// times; the caller judges every entry itself, so an entry taken for
/// current that is not (expired within a `stale_if_error` window, or the
/// text found by chance) is locked the usual way, in one more round trip.
///
/// KEYS: version keys, entries, their locks. ARGV: [`ClaimArgs`]: head,
/// token, lock ttl, the number of version keys, one fresh seed per version
/// key.
static CLAIM: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(CLAIM_BODY));
const CLAIM_BODY: &str = r"
local head, token, lock_ttl_ms, nv = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local n = (#KEYS - nv) / 2
local versions = {}
for i = 1, nv do
  local v = redis.call('GET', KEYS[i])
  if not v then
    v = ARGV[4 + i]
    redis.call('SET', KEYS[i], v)
  end
  versions[i] = v
end
local bound = '|' .. table.concat(versions, ',') .. '|'
local after = #head + 1
local claims = {}
-- In slices: unpack's arguments live on Lua's C stack, a few thousand at most.
for first = 1, n, 1000 do
  local last = math.min(first + 999, n)
  local entries = redis.call('MGET', unpack(KEYS, nv + first, nv + last))
  for i = first, last do
    local entry = entries[i - first + 1]
    -- The versions follow the head, or the head and a packing letter.
    local at = entry and string.find(entry, bound, after, true)
    if at and at <= after + 1 then
      claims[i] = 0
    else
      local lock = KEYS[nv + n + i]
      if redis.call('SET', lock, token, 'NX', 'PX', lock_ttl_ms) or redis.call('GET', lock) == token then
        claims[i] = 1
      else
        claims[i] = 2
      end
    end
  end
end
return claims
";

/// `SCRIPT LOAD` of [`CLAIM`], after a `NOSCRIPT`.
pub(crate) fn load_claim() -> redis::Cmd {
    let mut cmd = redis::cmd("SCRIPT");
    cmd.arg("LOAD").arg(CLAIM_BODY);
    cmd
}

/// Gives namespaces that have no version yet a random one, and returns the
/// versions of all keys. A namespace gets its version before anything is
/// computed under it, so every computation is bound to a version it
/// observed; and a version key that was evicted or flushed comes back as a
/// value no old entry is bound to.
pub(crate) fn seed_versions(version_keys: &[String]) -> redis::ScriptInvocation<'static> {
    static SEED_VERSIONS: LazyLock<redis::Script> = LazyLock::new(|| {
        redis::Script::new(
            r"
for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i], 'NX') end
return redis.call('MGET', unpack(KEYS))
",
        )
    });
    let mut invocation = SEED_VERSIONS.prepare_invoke();
    invocation.key(version_keys);
    for _ in version_keys {
        invocation.arg(fresh_seed());
    }
    invocation
}

/// Releases stampede locks, each only if the caller still holds it (its
/// token): a plain DEL could delete a lock that expired and was taken by
/// someone else. Keys are locks, arguments their tokens, in the same order.
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RELEASE_BODY));
const RELEASE_BODY: &str = r"
local released = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then released = released + redis.call('DEL', KEYS[i]) end
end
return released
";

/// [`RELEASE`] of one lock, sent alone.
pub(crate) fn release(lock: &str, token: &str) -> redis::ScriptInvocation<'static> {
    let mut invocation = RELEASE.key(lock);
    invocation.arg(token);
    invocation
}

/// [`RELEASE`] of `held` (lock, token) as one command of a pipeline:
/// `EVAL`, since a call releasing its locks should not depend on the
/// script being loaded. One script run for all of a bulk call's locks,
/// where one each cost Redis four times as much (`BENCH_ONLY=ours1 cargo
/// bench --bench many`); all of one call's locks live in its prefix's
/// cluster slot.
pub(crate) fn release_command(held: &[(&str, &str)]) -> redis::Cmd {
    let bytes: usize = held.iter().map(|(lock, token)| lock.len() + token.len()).sum();
    let mut cmd = super::command("EVAL", 2 + 2 * held.len(), RELEASE_BODY.len() + 20 + bytes);
    cmd.arg(RELEASE_BODY).arg(held.len());
    for (lock, _) in held {
        cmd.arg(*lock);
    }
    for (_, token) in held {
        cmd.arg(*token);
    }
    cmd
}

/// Bumps a namespace's version and announces it to local tiers; a missing
/// version starts from a random seed rather than from 1, which an evicted
/// version key may have had. Replies with the version as Redis's string:
/// Lua numbers are doubles. The announcement is best effort (`pcall`): an
/// ACL user without channel rights still invalidates.
pub(crate) fn invalidate(version_key: &str, channel: &str, message: &str) -> redis::ScriptInvocation<'static> {
    static INVALIDATE: LazyLock<redis::Script> = LazyLock::new(|| {
        redis::Script::new(
            r"
local seed, channel, message = unpack(ARGV, 1, 3)
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], seed) end
redis.call('INCR', KEYS[1])
redis.pcall('PUBLISH', channel, message)
return redis.call('GET', KEYS[1])
",
        )
    });
    let mut invocation = INVALIDATE.key(version_key);
    invocation.arg(fresh_seed()).arg(channel).arg(message);
    invocation
}

/// Replaces one entry with a tombstone and announces it to local tiers.
/// A tombstone rather than a `DEL`: a computation that observed the entry
/// (or its absence) before the forget expects that at its store, and so
/// never stores what it read before the write. Every tombstone is unique
/// (a random nonce) and lives `ttl_ms`. Replies 1 if there was an entry.
pub(crate) fn forget(entry: &str, ttl_ms: u64, channel: &str, message: &str) -> redis::ScriptInvocation<'static> {
    static FORGET: LazyLock<redis::Script> = LazyLock::new(|| {
        redis::Script::new(
            r"
local head, nonce, ttl_ms, channel, message = unpack(ARGV, 1, 5)
local old = redis.pcall('GET', KEYS[1])
local existed = type(old) == 'string' and string.sub(old, 1, #head) ~= head
redis.call('SET', KEYS[1], head .. nonce, 'PX', ttl_ms)
redis.pcall('PUBLISH', channel, message)
if existed then return 1 end
return 0
",
        )
    });
    let mut invocation = FORGET.key(entry);
    invocation.arg(crate::codec::TOMBSTONE).arg(nonce()).arg(ttl_ms.max(1)).arg(channel).arg(message);
    invocation
}

/// A tombstone's unique part.
fn nonce() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A tombstone for [`discard`]: unique, so its digest is one no
/// computation observed before it.
pub(crate) fn tombstone() -> Vec<u8> {
    format!("{}{}", crate::codec::TOMBSTONE, nonce()).into_bytes()
}

/// Replaces an entry with `tombstone` (living `ttl_ms`) only if it is
/// still the one read (its [`digest`]): a plain `DEL` could delete a good
/// entry stored since. A tombstone rather than a `DEL` for the reason
/// [`forget`] gives: a computation that observed the key empty before a
/// write-through stored this entry must not find it empty again.
pub(crate) fn discard(entry: &str, expect: &str, tombstone: &[u8], ttl_ms: u64) -> redis::ScriptInvocation<'static> {
    static DISCARD: LazyLock<redis::Script> = LazyLock::new(|| {
        with_helpers(
            r"
if digest(KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
",
        )
    });
    let mut invocation = DISCARD.key(entry);
    invocation.arg(expect).arg(tombstone).arg(ttl_ms.max(1));
    invocation
}

/// Where a script call's keys and arguments are written: an invocation
/// (sent alone, `EVALSHA` then `EVAL` after `NOSCRIPT`), or the [`Parts`]
/// of a pipelined `EVALSHA`.
trait ScriptCall {
    fn key<T: redis::ToRedisArgs>(&mut self, key: T) -> &mut Self;
    fn arg<T: redis::ToRedisArgs>(&mut self, arg: T) -> &mut Self;
}

impl ScriptCall for redis::ScriptInvocation<'_> {
    fn key<T: redis::ToRedisArgs>(&mut self, key: T) -> &mut Self {
        redis::ScriptInvocation::key(self, key)
    }
    fn arg<T: redis::ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        redis::ScriptInvocation::arg(self, arg)
    }
}

/// A script call's keys and arguments, for a pipeline: redis-rs sends an
/// invocation only on its own.
#[derive(Default)]
struct Parts {
    keys: Flat,
    args: Flat,
}

/// Arguments written one after another into one buffer: a bulk call's
/// claim has hundreds, which one allocation each made a visible share of
/// the call.
#[derive(Default)]
struct Flat {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl Flat {
    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(&self.ends).map(|(start, &end)| &self.data[start..end])
    }
}

impl redis::RedisWrite for Flat {
    fn write_arg(&mut self, arg: &[u8]) {
        self.data.extend_from_slice(arg);
        self.ends.push(self.data.len());
    }

    fn writer_for_next_arg(&mut self) -> impl std::io::Write + '_ {
        /// Ends the argument once everything is written.
        struct Next<'f>(&'f mut Flat);
        impl std::io::Write for Next<'_> {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.data.extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        impl Drop for Next<'_> {
            fn drop(&mut self) {
                self.0.ends.push(self.0.data.len());
            }
        }
        Next(self)
    }
}

impl ScriptCall for Parts {
    fn key<T: redis::ToRedisArgs>(&mut self, key: T) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }
    fn arg<T: redis::ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }
}

impl Parts {
    fn evalsha(self, script: &redis::Script) -> redis::Cmd {
        let (keys, args) = (self.keys.ends.len(), self.args.ends.len());
        let mut cmd = super::command("EVALSHA", 2 + keys + args, 40 + 20 + self.keys.data.len() + self.args.data.len());
        cmd.arg(script.get_hash()).arg(keys);
        for part in self.keys.iter().chain(self.args.iter()) {
            cmd.arg(part);
        }
        cmd
    }
}

/// `SCRIPT LOAD` for the scripts a pipeline sends, after a `NOSCRIPT`
/// (a restarted or flushed server).
pub(crate) fn load_pipelined() -> [redis::Cmd; 2] {
    [STORE_BODY, LOCK_BODY].map(|body| {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD").arg(format!("{HELPERS}{body}"));
        cmd
    })
}

/// A random starting version: far from 0, and below 2^52 so that no tool
/// that reads versions as doubles (Lua, JSON) ever rounds one.
fn fresh_seed() -> u64 {
    rand::random_range((1u64 << 32)..(1u64 << 52))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(arg: redis::Arg<&[u8]>) -> Vec<u8> {
        match arg {
            redis::Arg::Simple(bytes) => bytes.to_vec(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn a_pipelined_call_sends_the_keys_and_arguments_an_invocation_sends() {
        let versions = ["v1".to_owned(), "v2".to_owned()];
        let mut parts = Parts::default();
        parts.key(&versions[..]).key("entry").arg(&b"RC2|b|"[..]).arg(17u64).arg(-3i64).arg("").arg(2.5f64);
        let sent: Vec<Vec<u8>> = parts.evalsha(&STORE).args_iter().map(bytes).collect();
        let mut expected: Vec<Vec<u8>> = vec![b"EVALSHA".to_vec(), STORE.get_hash().into(), b"3".to_vec()];
        for part in ["v1", "v2", "entry", "RC2|b|", "17", "-3", "", "2.5"] {
            expected.push(part.into());
        }
        assert_eq!(sent, expected);
    }

    /// A pipeline's `EVALSHA` names the scripts by hash, and after a
    /// `NOSCRIPT` loads them from these sources: they must be the same.
    #[test]
    fn pipelined_loads_are_the_scripts_evalsha_names() {
        let loaded: Vec<String> = load_pipelined()
            .iter()
            .map(|load| {
                let source = load.args_iter().nth(2).map(bytes);
                sha1_smol::Sha1::from(source.unwrap_or_default()).digest().to_string()
            })
            .collect();
        assert_eq!(loaded, [STORE.get_hash(), LOCK.get_hash()]);
        let lock = LockArgs {
            entry: "e",
            lock: "e#lock",
            version_keys: &["v".to_owned()],
            head: b"RC2|b|",
            token: "t",
            lock_ttl_ms: 5,
            min_fresh_ms: 1,
            pinned: &[],
        }
        .command();
        let args: Vec<Vec<u8>> = lock.args_iter().map(bytes).collect();
        assert_eq!(
            &args[..9],
            [&b"EVALSHA"[..], LOCK.get_hash().as_bytes(), b"3", b"e", b"e#lock", b"v", b"RC2|b|", b"t", b"5"]
        );
        assert_eq!(args[9], b"1");
        assert_eq!(args.len(), 11, "one fresh seed per version key");
    }
}
