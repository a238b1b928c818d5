//! How values are stored: the codec, and the small header that binds an
//! entry to the namespace versions it was computed under.
//!
//! An entry is `RC2|<codec>[<packing>]|<v1>,<v2>,…|<stored>,<fresh until>|<payload>`,
//! the times in Unix milliseconds; `<packing>` is absent for a payload
//! stored as encoded, else the letter of its compression (`compress.rs`). The header is ASCII so a JSON entry stays
//! readable with `redis-cli GET`; anything that does not parse (foreign
//! data, another codec, a truncated value) is a miss. The times let every
//! process tell a fresh entry from a stale copy kept for `stale_if_error`,
//! and when refresh-ahead is due.

use crate::bounded::Bounded;
pub(crate) use crate::compress::Packing;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::fmt;

const MAGIC: &[u8] = b"RC2|";

/// What `forget` leaves at an entry's key, followed by a random nonce: a
/// miss for readers, and a change that in-flight computations' stores
/// see (`store/scripts.rs`).
pub(crate) const TOMBSTONE: &str = "RC2|-|";

/// Whether `bytes` is a tombstone: a plain miss, not a foreign entry.
pub(crate) fn is_tombstone(bytes: &[u8]) -> bool {
    bytes.starts_with(TOMBSTONE.as_bytes())
}

/// Bytes an entry may hold beyond `max_value_bytes`: the header, whose
/// namespace versions grow with the number of tags.
pub(crate) const HEADER_ALLOWANCE: usize = 16 << 10;

/// No byte limit: nothing decoding does allocates more than the payload
/// holds (see `bounded`), and callers refuse payloads over
/// `max_value_bytes` before decoding. (bincode's limit is a constant that
/// also counts primitives at their in-memory size, so no one constant could
/// follow `max_value_bytes`.)
type BincodeConfig = bincode::config::Configuration;

fn bincode_config() -> BincodeConfig {
    bincode::config::standard()
}

/// How a cached value is turned into bytes.
///
/// ```
/// use cache_runtime::Codec;
///
/// assert_eq!(Codec::default(), Codec::Bincode);
/// assert_eq!(Codec::Json.name(), "json");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Codec {
    /// bincode 2 through serde: compact and fast. The default.
    #[default]
    Bincode,
    /// JSON: larger, but `redis-cli GET` shows the value.
    Json,
}

impl Codec {
    /// The name used in `#[cached(codec = "...")]`.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Bincode => "bincode",
            Codec::Json => "json",
        }
    }

    fn tag(self) -> u8 {
        match self {
            Codec::Bincode => b'b',
            Codec::Json => b'j',
        }
    }

    /// The header up to and excluding the versions: `RC2|b|`, or with the
    /// packing's letter, `RC2|bl|`.
    pub(crate) fn head(self, packing: Packing) -> &'static [u8] {
        match (self, packing) {
            (Codec::Bincode, Packing::Raw) => b"RC2|b|",
            (Codec::Bincode, Packing::Lz4) => b"RC2|bl|",
            (Codec::Bincode, Packing::Zstd) => b"RC2|bz|",
            (Codec::Json, Packing::Raw) => b"RC2|j|",
            (Codec::Json, Packing::Lz4) => b"RC2|jl|",
            (Codec::Json, Packing::Zstd) => b"RC2|jz|",
        }
    }

    /// What every entry of this codec starts with, however it is packed:
    /// `RC2|b` (the lock script allows one packing letter after it).
    pub(crate) fn lock_head(self) -> [u8; 5] {
        [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], self.tag()]
    }

    pub(crate) fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>, CodecError> {
        match self {
            Codec::Bincode => {
                bincode::serde::encode_to_vec(value, bincode_config()).map_err(|e| CodecError(e.to_string()))
            }
            Codec::Json => serde_json::to_vec(value).map_err(|e| CodecError(e.to_string())),
        }
    }

    /// Decodes a payload no longer than the entry cap (`max_value_bytes`
    /// plus header) allows: an entry read from Redis is capped before it
    /// gets here (`connection`). Prefer [`decode_within`](Self::decode_within).
    #[cfg(test)]
    pub(crate) fn decode<T: DeserializeOwned>(self, payload: &[u8]) -> Result<T, CodecError> {
        self.decode_within(payload, usize::MAX)
    }

    /// Decodes a payload, refusing one longer than `max_bytes` (the
    /// cache's `max_value_bytes`: nothing longer was stored by a cache with
    /// this setting). Decoding allocates no more than the payload holds
    /// and refuses values nested deeper than [`bounded::MAX_DEPTH`].
    ///
    /// [`bounded::MAX_DEPTH`]: crate::bounded::MAX_DEPTH
    pub(crate) fn decode_within<T: DeserializeOwned>(self, payload: &[u8], max_bytes: usize) -> Result<T, CodecError> {
        if payload.len() > max_bytes {
            return Err(CodecError(format!(
                "the payload is {} bytes, over max_value_bytes ({max_bytes})",
                payload.len()
            )));
        }
        match self {
            Codec::Bincode => {
                let mut decoder = bincode::serde::BorrowedSerdeDecoder::from_slice(payload, bincode_config(), ());
                let value = T::deserialize(Bounded::new(decoder.as_deserializer(), payload.len()))
                    .map_err(|e| CodecError(e.to_string()))?;
                if u8::deserialize(decoder.as_deserializer()).is_ok() {
                    // Left-over bytes mean the value was written for another layout.
                    return Err(CodecError("trailing bytes after the value".to_owned()));
                }
                Ok(value)
            }
            // serde_json stops at 128 levels by itself, and allocates
            // strings from the bytes it reads, never from a claimed length.
            Codec::Json => serde_json::from_slice(payload).map_err(|e| CodecError(e.to_string())),
        }
    }
}

/// A value that could not be encoded or decoded.
#[derive(Debug, Clone)]
pub struct CodecError(String);

impl CodecError {
    pub(crate) fn new(why: String) -> Self {
        CodecError(why)
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A stored entry, split into its parts without copying.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct StoredEntry<'a> {
    pub codec_tag: u8,
    /// How the payload is packed; `payload` is as stored.
    pub packing: Packing,
    pub versions: &'a [u8],
    pub times: EntryTimes,
    pub payload: &'a [u8],
}

/// When an entry was stored and until when it is fresh, in Unix ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EntryTimes {
    pub stored_ms: u64,
    pub fresh_until_ms: u64,
}

impl EntryTimes {
    /// The header field: `<stored>,<fresh until>`.
    pub(crate) fn field(self) -> String {
        format!("{},{}", self.stored_ms, self.fresh_until_ms)
    }

    pub(crate) fn is_fresh(self, now_ms: u64) -> bool {
        now_ms < self.fresh_until_ms
    }

    /// True once `ratio` of the entry's fresh life has passed.
    pub(crate) fn is_due(self, now_ms: u64, ratio: f64) -> bool {
        let life = self.fresh_until_ms.saturating_sub(self.stored_ms) as f64;
        now_ms as f64 >= self.stored_ms as f64 + life * ratio
    }
}

fn parse_ms(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

impl<'a> StoredEntry<'a> {
    pub(crate) fn parse(bytes: &'a [u8]) -> Option<Self> {
        let rest = bytes.strip_prefix(MAGIC)?;
        let (&codec_tag, rest) = rest.split_first()?;
        let (packing, rest) = match rest.split_first()? {
            (b'|', rest) => (Packing::Raw, rest),
            (&letter, rest) => (Packing::from_letter(letter)?, rest.strip_prefix(b"|")?),
        };
        let end = rest.iter().position(|&b| b == b'|')?;
        let (versions, rest) = (&rest[..end], &rest[end + 1..]);
        let end = rest.iter().position(|&b| b == b'|')?;
        let (stored, fresh_until) = rest[..end].split_at(rest[..end].iter().position(|&b| b == b',')?);
        let times = EntryTimes { stored_ms: parse_ms(stored)?, fresh_until_ms: parse_ms(&fresh_until[1..])? };
        Some(Self { codec_tag, packing, versions, times, payload: &rest[end + 1..] })
    }

    pub(crate) fn is_codec(&self, codec: Codec) -> bool {
        self.codec_tag == codec.tag()
    }

    /// True when the entry was bound to exactly these current versions.
    pub(crate) fn is_bound_to<'v>(&self, current: impl IntoIterator<Item = Option<&'v [u8]>>) -> bool {
        let mut stored = self.versions.split(|&b| b == b',');
        for version in current {
            match (stored.next(), version) {
                (Some(s), Some(c)) if s == c => {}
                _ => return false,
            }
        }
        stored.next().is_none()
    }
}

/// An entry's bytes: `head` ([`Codec::head`]), the versions it is bound
/// to joined by ',', then `times` (`<stored>,<fresh until>`) and the
/// payload, each after a '|'. Byte for byte what the `STORE` script writes
/// (`store/scripts.rs`), so that a reader cannot tell an entry filled
/// without the script from one the script stored.
pub(crate) fn entry_bytes(head: &[u8], versions: &[Vec<u8>], times: &str, payload: &[u8]) -> Vec<u8> {
    let separators = versions.len().saturating_sub(1) + 2;
    let len = head.len() + versions.iter().map(Vec::len).sum::<usize>() + separators + times.len() + payload.len();
    let mut bytes = Vec::with_capacity(len);
    bytes.extend_from_slice(head);
    for (i, version) in versions.iter().enumerate() {
        if i > 0 {
            bytes.push(b',');
        }
        bytes.extend_from_slice(version);
    }
    bytes.push(b'|');
    bytes.extend_from_slice(times.as_bytes());
    bytes.push(b'|');
    bytes.extend_from_slice(payload);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_and_bind() {
        let e = StoredEntry::parse(b"RC2|j|12,7|1000,2000|{\"a\":1}").unwrap();
        assert!(e.is_codec(Codec::Json));
        assert_eq!(e.payload, b"{\"a\":1}");
        assert_eq!(e.times, EntryTimes { stored_ms: 1000, fresh_until_ms: 2000 });
        assert!(e.times.is_fresh(1999) && !e.times.is_fresh(2000));
        assert!(!e.times.is_due(1799, 0.8) && e.times.is_due(1800, 0.8));
        assert!(e.is_bound_to([Some(&b"12"[..]), Some(&b"7"[..])]));
        assert!(!e.is_bound_to([Some(&b"13"[..]), Some(&b"7"[..])]));
        assert!(!e.is_bound_to([Some(&b"12"[..])]));
        assert!(!e.is_bound_to([Some(&b"12"[..]), None]));
        let e = StoredEntry::parse(b"RC2|bl|12|1000,2000|xyz").unwrap();
        assert!(e.is_codec(Codec::Bincode) && e.packing == Packing::Lz4 && e.payload == b"xyz");
        assert_eq!(StoredEntry::parse(b"RC2|bz|12|1000,2000|xyz").unwrap().packing, Packing::Zstd);
        assert_eq!(StoredEntry::parse(b"RC2|b|12|1000,2000|xyz").unwrap().packing, Packing::Raw);
        // An unknown packing letter, or more than one, is not an entry.
        assert_eq!(StoredEntry::parse(b"RC2|bq|12|1000,2000|xyz"), None);
        assert_eq!(StoredEntry::parse(b"RC2|blz|12|1000,2000|xyz"), None);
        for packing in [Packing::Raw, Packing::Lz4, Packing::Zstd] {
            let head = Codec::Json.head(packing);
            assert!(head.starts_with(&Codec::Json.lock_head()));
            let entry = [head, b"1|1,2|{}"].concat();
            assert_eq!(StoredEntry::parse(&entry).map(|e| e.packing), Some(packing));
        }
        assert_eq!(StoredEntry::parse(b"garbage"), None);
        assert_eq!(StoredEntry::parse(b"RC2|b"), None);
        for bad in [&b"RC1|j|12|{}"[..], b"RC2|j|12|{}", b"RC2|j|12|1,|{}", b"RC2|j|12|x,2|{}", b"RC2|j|12|1000|{}"] {
            assert_eq!(StoredEntry::parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn entry_bytes_are_the_header_readers_parse() {
        let versions = [b"12".to_vec(), b"7".to_vec()];
        let bytes = entry_bytes(b"RC2|bl|", &versions, "1000,2000", b"x|y");
        assert_eq!(bytes, b"RC2|bl|12,7|1000,2000|x|y");
        assert_eq!(bytes.capacity(), bytes.len());
        let e = StoredEntry::parse(&bytes).unwrap();
        assert!(e.is_bound_to([Some(&b"12"[..]), Some(&b"7"[..])]) && e.payload == b"x|y");
        // No versions: what Lua's `table.concat` of an empty table gives.
        assert_eq!(entry_bytes(b"RC2|b|", &[], "1,2", b""), b"RC2|b||1,2|");
    }

    #[test]
    fn bincode_rejects_truncated_and_padded_values() {
        let bytes = Codec::Bincode.encode(&(1u32, String::from("hello"))).unwrap();
        assert!(Codec::Bincode.decode::<(u32, String)>(&bytes).is_ok());
        assert!(Codec::Bincode.decode::<(u32, String)>(&bytes[..bytes.len() - 1]).is_err());
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(Codec::Bincode.decode::<(u32, String)>(&padded).is_err());
    }

    #[test]
    fn a_huge_length_prefix_fails_without_allocating_it() {
        // varint 0xFF + u64::MAX/2: "a vector of 4.6e18 elements".
        let mut bogus = vec![0xffu8];
        bogus.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(Codec::Bincode.decode::<Vec<u64>>(&bogus).is_err());
        assert!(Codec::Bincode.decode::<String>(&bogus).is_err());
    }

    /// A recursive type: each `Node` is one nesting level, one byte in
    /// bincode.
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    enum Nest {
        Leaf,
        Node(Box<Nest>),
    }

    fn nested(levels: usize) -> Vec<u8> {
        let mut bytes = vec![1u8; levels];
        bytes.push(0);
        bytes
    }

    #[test]
    fn nesting_past_the_limit_is_a_decode_error() {
        let within = nested(crate::bounded::MAX_DEPTH - 1);
        assert!(Codec::Bincode.decode::<Nest>(&within).is_ok());
        let err = Codec::Bincode.decode::<Nest>(&nested(crate::bounded::MAX_DEPTH + 1)).unwrap_err();
        assert!(err.to_string().contains("nests deeper than 128 levels"), "{err}");
    }

    #[test]
    fn values_of_every_shape_round_trip() {
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        struct Unit;
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        struct Wrapper(u64);
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        enum Shape {
            Unit,
            Tuple(i128, char),
            Struct { name: String, bytes: Vec<u8> },
        }
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        struct All {
            text: String,
            unit: Unit,
            wrapper: Wrapper,
            shapes: Vec<Shape>,
            map: std::collections::BTreeMap<String, Option<(f64, bool)>>,
            nest: Nest,
        }
        let value = All {
            text: "héllo".to_owned(),
            unit: Unit,
            wrapper: Wrapper(u64::MAX),
            shapes: vec![
                Shape::Unit,
                Shape::Tuple(-1, 'λ'),
                Shape::Struct { name: "n".to_owned(), bytes: vec![0, 255] },
            ],
            map: [("a".to_owned(), Some((1.5, true))), ("b".to_owned(), None)].into_iter().collect(),
            nest: Nest::Node(Box::new(Nest::Leaf)),
        };
        for codec in [Codec::Bincode, Codec::Json] {
            let bytes = codec.encode(&value).unwrap();
            assert_eq!(codec.decode::<All>(&bytes).unwrap(), value);
        }
    }

    #[test]
    fn payloads_over_the_limit_are_refused_before_decoding() {
        let bytes = Codec::Bincode.encode(&"x".repeat(100)).unwrap();
        assert!(Codec::Bincode.decode_within::<String>(&bytes, bytes.len()).is_ok());
        let err = Codec::Bincode.decode_within::<String>(&bytes, bytes.len() - 1).unwrap_err();
        assert!(err.to_string().contains("over max_value_bytes"), "{err}");
    }
}
