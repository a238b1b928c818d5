//! How values are stored: the codec, and the small header that binds an
//! entry to the namespace versions it was computed under.
//!
//! An entry is `RC2|<codec>|<v1>,<v2>,…|<stored>,<fresh until>|<payload>`,
//! the times in Unix milliseconds. The header is ASCII so a JSON entry stays
//! readable with `redis-cli GET`; anything that does not parse (foreign
//! data, another codec, a truncated value) is a miss. The times let every
//! process tell a fresh entry from a stale copy kept for `stale_if_error`,
//! and when refresh-ahead is due.

use serde::{Serialize, de::DeserializeOwned};
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

/// Decoding refuses to claim more than this much memory, whatever a corrupt
/// length prefix says. Entries are capped well below it by
/// `max_value_bytes`.
const DECODE_LIMIT: usize = 256 << 20;

type BincodeConfig = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<DECODE_LIMIT>,
>;

fn bincode_config() -> BincodeConfig {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
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

    /// The header up to and excluding the versions: `RC2|b|`.
    pub(crate) fn head(self) -> [u8; 6] {
        [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], self.tag(), b'|']
    }

    pub(crate) fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>, CodecError> {
        match self {
            Codec::Bincode => {
                bincode::serde::encode_to_vec(value, bincode_config()).map_err(|e| CodecError(e.to_string()))
            }
            Codec::Json => serde_json::to_vec(value).map_err(|e| CodecError(e.to_string())),
        }
    }

    pub(crate) fn decode<T: DeserializeOwned>(self, payload: &[u8]) -> Result<T, CodecError> {
        match self {
            Codec::Bincode => {
                let (value, read) = bincode::serde::decode_from_slice(payload, bincode_config())
                    .map_err(|e| CodecError(e.to_string()))?;
                if read != payload.len() {
                    // Left-over bytes mean the value was written for another layout.
                    return Err(CodecError(format!("{} trailing bytes", payload.len() - read)));
                }
                Ok(value)
            }
            Codec::Json => serde_json::from_slice(payload).map_err(|e| CodecError(e.to_string())),
        }
    }
}

/// A value that could not be encoded or decoded.
#[derive(Debug, Clone)]
pub struct CodecError(String);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A stored entry, split into its parts without copying.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct StoredEntry<'a> {
    pub codec_tag: u8,
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
        let rest = rest.strip_prefix(b"|")?;
        let end = rest.iter().position(|&b| b == b'|')?;
        let (versions, rest) = (&rest[..end], &rest[end + 1..]);
        let end = rest.iter().position(|&b| b == b'|')?;
        let (stored, fresh_until) = rest[..end].split_at(rest[..end].iter().position(|&b| b == b',')?);
        let times = EntryTimes { stored_ms: parse_ms(stored)?, fresh_until_ms: parse_ms(&fresh_until[1..])? };
        Some(Self { codec_tag, versions, times, payload: &rest[end + 1..] })
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
        assert_eq!(StoredEntry::parse(b"garbage"), None);
        assert_eq!(StoredEntry::parse(b"RC2|b"), None);
        for bad in [&b"RC1|j|12|{}"[..], b"RC2|j|12|{}", b"RC2|j|12|1,|{}", b"RC2|j|12|x,2|{}", b"RC2|j|12|1000|{}"] {
            assert_eq!(StoredEntry::parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
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
}
