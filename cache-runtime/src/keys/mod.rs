//! Cache keys: a readable namespace followed by a hash of what identifies
//! the call.

pub(crate) mod canonical;

use canonical::Unencodable;
use serde::Serialize;
use std::fmt;
use std::sync::Arc;

/// Bumped only if the key layout itself changes; folded into every hash.
const KEY_SCHEMA: &[u8] = b"cache-runtime/key/v1";

/// The 128-bit identity of one call: function, version, types and arguments.
///
/// Build it with [`KeyHasher`]. Two calls share a `KeyHash` only when every
/// input to the hasher was equal, so entries of different functions (or of
/// different instantiations of a generic function) never meet.
///
/// ```
/// use cache_runtime::__private::KeyHasher;
///
/// let mut a = KeyHasher::new("shop::price", 1);
/// a.arg(&42u64).unwrap();
/// let mut b = KeyHasher::new("shop::price", 1);
/// b.arg(&42u64).unwrap();
/// assert_eq!(a.finish(), b.finish());
/// assert_eq!(a.finish().to_string().len(), 32);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash([u8; 16]);

impl KeyHash {
    /// The hash as 32 lowercase hex digits, the last part of the Redis key.
    pub fn to_hex(&self) -> [u8; 32] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 32];
        for (i, byte) in self.0.iter().enumerate() {
            out[2 * i] = DIGITS[usize::from(byte >> 4)];
            out[2 * i + 1] = DIGITS[usize::from(byte & 0x0f)];
        }
        out
    }

    /// The hash's first two bytes: uniform, for spreading keys over
    /// stripes.
    pub(crate) fn first_bytes(&self) -> [u8; 2] {
        [self.0[0], self.0[1]]
    }

    /// The hash as two words: uniform and independent, for a table's slot
    /// and fingerprint.
    pub(crate) fn words(&self) -> (u64, u64) {
        let [a, b, c, d, e, f, g, h, rest @ ..] = self.0;
        (u64::from_le_bytes([a, b, c, d, e, f, g, h]), u64::from_le_bytes(rest))
    }

    /// Parses [`to_hex`](Self::to_hex)'s output.
    pub(crate) fn from_hex(hex: &[u8]) -> Option<Self> {
        if hex.len() != 32 {
            return None;
        }
        let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
        let mut out = [0u8; 16];
        for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            *byte = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Some(KeyHash(out))
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.to_hex();
        // Hex digits are ASCII, so this never fails.
        f.write_str(std::str::from_utf8(&hex).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({self})")
    }
}

/// Hashes a call's identity and arguments into a [`KeyHash`].
///
/// `#[cached]` drives this for you; use it directly with
/// [`Cache::get_or_compute`](crate::Cache::get_or_compute) when the attribute
/// does not fit. Arguments are encoded with a stable, self-delimiting
/// encoding (never `Debug` or `std::hash`), maps in sorted order, so equal
/// arguments give equal keys in every process and on every platform.
///
/// ```
/// use cache_runtime::__private::KeyHasher;
/// use std::collections::HashMap;
///
/// let map_a: HashMap<u32, &str> = [(1, "a"), (2, "b")].into();
/// let map_b: HashMap<u32, &str> = [(2, "b"), (1, "a")].into();
/// let hash = |m: &HashMap<u32, &str>| {
///     let mut h = KeyHasher::new("report", 1);
///     h.arg(m).unwrap();
///     h.finish()
/// };
/// assert_eq!(hash(&map_a), hash(&map_b));
/// ```
#[derive(Clone)]
pub struct KeyHasher {
    hasher: blake3::Hasher,
}

impl KeyHasher {
    /// Starts a key for `function` (any name unique to the computation) at
    /// layout `version`.
    pub fn new(function: &str, version: u32) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(KEY_SCHEMA);
        let mut this = Self { hasher };
        this.part(function.as_bytes());
        this.part(&version.to_le_bytes());
        this
    }

    /// Folds in a length-delimited identity part: a type name, the return
    /// type as written.
    pub fn part(&mut self, bytes: &[u8]) -> &mut Self {
        self.hasher.update(&(bytes.len() as u64).to_le_bytes());
        self.hasher.update(bytes);
        self
    }

    /// Folds in one argument, canonically encoded.
    ///
    /// Fails only when the argument's own `Serialize` impl fails; the call is
    /// then computed without the cache.
    pub fn arg<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<&mut Self, Unencodable> {
        canonical::encode(&mut self.hasher, value)?;
        Ok(self)
    }

    /// Folds in the arguments a [`KeyTail`] encoded.
    #[doc(hidden)]
    pub fn tail(&mut self, tail: &KeyTail) -> &mut Self {
        self.hasher.update(&tail.0);
        self
    }

    /// The identity hashed so far, sealed into 32 bytes, for
    /// [`keyed`](Self::keyed): a call site hashes its identity once.
    pub(crate) fn seal(&self) -> [u8; 32] {
        *self.hasher.finalize().as_bytes()
    }

    /// Continues from a sealed identity: blake3 keyed with it, so only the
    /// arguments are hashed per call.
    pub(crate) fn keyed(identity: &[u8; 32]) -> Self {
        Self { hasher: blake3::Hasher::new_keyed(identity) }
    }

    /// The finished hash.
    pub fn finish(&self) -> KeyHash {
        let digest = self.hasher.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest.as_bytes()[..16]);
        KeyHash(out)
    }
}

/// The arguments after a bulk call's items, encoded once: each item's key
/// hashes the arguments before the items, the item, then these, exactly
/// as a single call with the item in place of the items would. Not a
/// public API: `#[cached(batch(..))]` builds it.
///
/// ```
/// use cache_runtime::__private::{KeyHasher, KeyTail};
///
/// let mut single = KeyHasher::new("f", 1);
/// single.arg(&"eu").unwrap().arg(&7u64).unwrap().arg(&true).unwrap();
/// let mut tail = KeyTail::new();
/// tail.arg(&true).unwrap();
/// let mut item = KeyHasher::new("f", 1);
/// item.arg(&"eu").unwrap().arg(&7u64).unwrap().tail(&tail);
/// assert_eq!(item.finish(), single.finish());
/// ```
#[doc(hidden)]
#[derive(Debug, Clone, Default)]
pub struct KeyTail(Vec<u8>);

impl KeyTail {
    /// No arguments after the items.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Encodes one more argument, as [`KeyHasher::arg`] would.
    pub fn arg<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<&mut Self, Unencodable> {
        canonical::encode(&mut self.0, value)?;
        Ok(self)
    }
}

/// The Redis keys of one entry.
///
/// `app:prefix:{prefix}<hex>`: readable first, so `redis-cli --scan
/// --pattern 'app:prefix:*'` finds a namespace; the `{prefix}` hash tag
/// puts a namespace's entries, locks and version key in one Redis Cluster
/// slot. Braces are refused in prefixes and key prefixes, so the first `{`
/// is always this one.
#[derive(Debug)]
pub(crate) struct EntryKeys<'v> {
    app: &'v str,
    prefix: &'v str,
    hash: KeyHash,
    /// Built on first use: a hit in the local tier never needs it.
    entry: std::sync::OnceLock<String>,
    /// One version key per namespace, the prefix's first.
    pub versions: &'v Arc<[String]>,
}

impl<'v> EntryKeys<'v> {
    pub(crate) fn new(app: &'v str, prefix: &'v str, versions: &'v Arc<[String]>, hash: KeyHash) -> Self {
        Self { app, prefix, hash, entry: std::sync::OnceLock::new(), versions }
    }

    /// The hash the keys are made of.
    pub(crate) fn hash(&self) -> KeyHash {
        self.hash
    }

    /// The entry's key.
    pub(crate) fn entry(&self) -> &str {
        self.entry.get_or_init(|| entry_key(self.app, self.prefix, self.hash))
    }

    /// The stampede lock: `<entry>#lock`. Only misses need it.
    pub(crate) fn lock(&self) -> String {
        let entry = self.entry();
        let mut lock = String::with_capacity(entry.len() + 5);
        lock.push_str(entry);
        lock.push_str("#lock");
        lock
    }
}

/// `app:prefix:{prefix}<32 hex digits>`.
pub(crate) fn entry_key(app: &str, prefix: &str, hash: KeyHash) -> String {
    let hex = hash.to_hex();
    let mut entry = namespace_head(app, prefix, hex.len());
    entry.extend(hex.iter().map(|&b| char::from(b)));
    entry
}

/// `app:namespace:{namespace}#v`, in the namespace's slot.
pub(crate) fn version_key(app: &str, namespace: &str) -> String {
    let mut key = namespace_head(app, namespace, 2);
    key.push_str("#v");
    key
}

/// `app:namespace:{namespace}`, with room for `extra` more bytes.
fn namespace_head(app: &str, namespace: &str, extra: usize) -> String {
    let mut key = String::with_capacity(app.len() + 2 * namespace.len() + 4 + extra);
    key.push_str(app);
    key.push(':');
    key.push_str(namespace);
    key.push_str(":{");
    key.push_str(namespace);
    key.push('}');
    key
}

/// The namespace every entry belongs to, after its prefix and tags:
/// [`Cache::clear`](crate::Cache::clear) invalidates it, one version for
/// the whole cache. `#` is refused in user namespaces, so no prefix or tag
/// can be it, and `redis-cli --scan` still finds its version key under the
/// key prefix: `<key_prefix>:#all:{#all}#v`.
pub(crate) const CACHE_WIDE: &str = "#all";

/// The namespace of `key` if it is an entry's key of this `key_prefix`
/// (`<key_prefix>:<ns>:{<ns>}<hash>`); `None` for any other key: a
/// version, a lock, another cache's key (`app2:…`, or `app:x:…` of a cache
/// whose key prefix is `app:x`), or anything else. For purging, which must
/// never touch what is not ours.
pub(crate) fn entry_namespace<'k>(key_prefix: &str, key: &'k str) -> Option<&'k str> {
    let rest = key.strip_prefix(key_prefix)?.strip_prefix(':')?;
    let open = rest.find('{')?;
    let namespace = rest[..open].strip_suffix(':')?;
    let hash = rest[open + 1..].strip_prefix(namespace)?.strip_prefix('}')?;
    let is_hash = !hash.is_empty() && hash.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (is_hash && check_namespace(namespace).is_ok()).then_some(namespace)
}

/// A `SCAN MATCH` pattern for every key of `key_prefix`: glob characters
/// in the prefix are escaped, so `app*` matches only `app*:…`.
pub(crate) fn scan_pattern(key_prefix: &str) -> String {
    let mut pattern = String::with_capacity(key_prefix.len() + 2);
    for c in key_prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push_str(":*");
    pattern
}

/// A namespace name must keep keys unambiguous and easy to type in
/// `redis-cli`; `#[cached]` checks the same rules at compile time.
pub(crate) fn check_namespace(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a namespace must not be empty".to_owned());
    }
    match name.chars().find(|c| c.is_whitespace() || c.is_control() || "{}*?[]#".contains(*c)) {
        Some(c) => Err(format!("namespace {name:?} contains {c:?}: use letters, digits, `_`, `-`, `.` or `:`")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(function: &str, version: u32, args: &[u32]) -> KeyHash {
        let mut h = KeyHasher::new(function, version);
        for a in args {
            h.arg(a).unwrap();
        }
        h.finish()
    }

    #[test]
    fn hex_round_trips() {
        let hash = key("f", 1, &[7]);
        assert_eq!(KeyHash::from_hex(&hash.to_hex()), Some(hash));
        assert_eq!(KeyHash::from_hex(b"00"), None);
        assert_eq!(KeyHash::from_hex(&[b'g'; 32]), None);
    }

    #[test]
    fn keys_are_pinned_across_releases() {
        // Changing this value means every deployed cache goes cold: only ever
        // together with KEY_SCHEMA.
        assert_eq!(key("f", 1, &[1, 2]).to_string(), "b9ea0c1fbe8f59c133616bf76fb00c0f");
    }

    /// The part of a key Redis Cluster hashes: the first non-empty `{...}`.
    fn hash_tag(key: &str) -> &str {
        key.find('{')
            .and_then(|open| key[open + 1..].find('}').map(|len| &key[open + 1..open + 1 + len]))
            .filter(|tag| !tag.is_empty())
            .unwrap_or(key)
    }

    #[test]
    fn a_namespace_lives_in_one_cluster_slot() {
        let versions: Arc<[String]> = vec![version_key("myapp", "products")].into();
        let keys = EntryKeys::new("myapp", "products", &versions, key("f", 1, &[]));
        assert!(keys.entry().starts_with("myapp:products:{products}"), "{}", keys.entry());
        assert_eq!(keys.entry().len(), "myapp:products:{products}".len() + 32);
        assert_eq!(keys.lock(), format!("{}#lock", keys.entry()));
        assert_eq!(&**keys.versions, ["myapp:products:{products}#v"]);
        for key in [&keys.lock(), &keys.versions[0]] {
            assert_eq!(hash_tag(key), hash_tag(keys.entry()));
        }
        assert_eq!(hash_tag(keys.entry()), "products");
    }

    #[test]
    fn only_our_entry_keys_are_recognised() {
        let entry = entry_key("app", "products", key("f", 1, &[]));
        assert_eq!(entry_namespace("app", &entry), Some("products"));
        let tagged = entry_key("app", "a:b", key("f", 1, &[]));
        assert_eq!(entry_namespace("app", &tagged), Some("a:b"));
        for other in [
            format!("{entry}#lock"),
            version_key("app", "products"),
            version_key("app", CACHE_WIDE),
            entry_key("app2", "products", key("f", 1, &[])),
            entry_key("app:x", "products", key("f", 1, &[])),
            "app:invalidations".to_owned(),
            "app:products:{other}0123".to_owned(),
            "app:products:{products}".to_owned(),
            "app:products:{products}ab cd".to_owned(),
            "application:products:{products}00".to_owned(),
        ] {
            assert_eq!(entry_namespace("app", &other), None, "{other}");
        }
        assert_eq!(entry_namespace("app:x", &entry_key("app:x", "p", key("f", 1, &[]))), Some("p"));
        assert_eq!(scan_pattern("app"), "app:*");
        assert_eq!(scan_pattern("a*p?[x]"), "a\\*p\\?\\[x\\]:*");
    }

    #[test]
    fn identity_and_version_separate_keys() {
        assert_ne!(key("f", 1, &[1]), key("g", 1, &[1]));
        assert_ne!(key("f", 1, &[1]), key("f", 2, &[1]));
        assert_ne!(key("f", 1, &[1, 2]), key("f", 1, &[2, 1]));
    }
}
