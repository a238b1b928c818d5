//! Compression of stored payloads: which algorithm, the one place a
//! payload is compressed on its way to Redis ([`pack`]) and the one place
//! it is decompressed on its way back ([`unpack`]).
//!
//! Only what Redis holds is compressed. Everything in this process (the
//! local tier, the value handed to waiters, a stale copy) is the encoded
//! value as the codec wrote it, so a local hit never pays for
//! decompression. The entry header names the algorithm (`codec.rs`):
//! `RC2|b|` is an uncompressed bincode entry, as every entry was before
//! compression existed, `RC2|bl|` an lz4 one, `RC2|bz|` a zstd one.
//!
//! Decompression trusts nothing it reads: both formats state the size
//! they decompress to, and a size over `max_value_bytes` is refused before
//! a byte is allocated.

use crate::codec::CodecError;
use std::borrow::Cow;

/// How values above the cache's compression threshold are compressed
/// before they are stored in Redis.
///
/// ```
/// use cache_runtime::{Compression, Policy};
///
/// assert_eq!(Compression::default(), Compression::Lz4);
/// assert_eq!(Compression::Lz4.name(), "lz4");
/// let policy = Policy::new("reports").compress(Compression::None);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Compression {
    /// Stored as encoded.
    None,
    /// LZ4 (the block format, pure Rust `lz4_flex`): a few hundred
    /// nanoseconds per kilobyte each way, about 2–4× smaller on text-like
    /// values. The default.
    #[default]
    Lz4,
    /// Zstandard at level 3: smaller than LZ4, slower to compress. Needs
    /// the cargo feature `zstd`, which builds the C library.
    #[cfg(feature = "zstd")]
    #[cfg_attr(docsrs, doc(cfg(feature = "zstd")))]
    Zstd,
}

impl Compression {
    /// The name used in `#[cached(compress = "...")]`.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            #[cfg(feature = "zstd")]
            Compression::Zstd => "zstd",
        }
    }
}

/// How a stored payload is packed: the letter after the codec's in the
/// entry header. Known to every build, whatever its features, so that an
/// entry a `zstd` build wrote is recognised (and refused with a reason)
/// by one without.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Packing {
    Raw,
    Lz4,
    Zstd,
}

impl Packing {
    /// The packing a header's letter names (`Codec::head` writes them).
    pub(crate) fn from_letter(letter: u8) -> Option<Self> {
        match letter {
            b'l' => Some(Packing::Lz4),
            b'z' => Some(Packing::Zstd),
            _ => None,
        }
    }
}

/// Payloads shorter than this are stored as encoded, unless the builder
/// says otherwise (`CacheBuilder::compress_threshold`).
pub(crate) const DEFAULT_THRESHOLD: usize = 512;

/// The most LZ4 can expand: a run of one byte encodes at most 255 bytes of
/// output per byte of input. A claimed size past this for the bytes given
/// is a crafted entry, refused without allocating.
const LZ4_MAX_RATIO: usize = 255;

/// zstd's level: its default, the usual trade of ratio for speed.
#[cfg(feature = "zstd")]
const ZSTD_LEVEL: i32 = 3;

/// The bytes to store for `payload`: compressed with `compression` when it
/// is at least `threshold` bytes long and compressing makes it smaller;
/// otherwise the payload itself.
pub(crate) fn pack(payload: &[u8], compression: Compression, threshold: usize) -> (Packing, Cow<'_, [u8]>) {
    if payload.len() < threshold {
        return (Packing::Raw, Cow::Borrowed(payload));
    }
    let packed = match compression {
        Compression::None => None,
        Compression::Lz4 => Some((Packing::Lz4, lz4_flex::block::compress_prepend_size(payload))),
        #[cfg(feature = "zstd")]
        Compression::Zstd => zstd_pack(payload).map(|bytes| (Packing::Zstd, bytes)),
    };
    match packed {
        // Incompressible data (an image, a gzipped body) is stored as is:
        // the reader then skips decompression too.
        Some((packing, bytes)) if bytes.len() < payload.len() => (packing, Cow::Owned(bytes)),
        _ => (Packing::Raw, Cow::Borrowed(payload)),
    }
}

/// The payload of a stored entry, decompressed; refused if it would be
/// over `max_bytes` (the cache's `max_value_bytes`), before allocating.
pub(crate) fn unpack(stored: &[u8], packing: Packing, max_bytes: usize) -> Result<Cow<'_, [u8]>, CodecError> {
    match packing {
        Packing::Raw => Ok(Cow::Borrowed(stored)),
        Packing::Lz4 => lz4_unpack(stored, max_bytes).map(Cow::Owned),
        #[cfg(feature = "zstd")]
        Packing::Zstd => zstd_unpack(stored, max_bytes).map(Cow::Owned),
        #[cfg(not(feature = "zstd"))]
        Packing::Zstd => Err(CodecError::new("a zstd entry, and this build lacks the cargo feature `zstd`".to_owned())),
    }
}

fn lz4_unpack(stored: &[u8], max_bytes: usize) -> Result<Vec<u8>, CodecError> {
    let Some((size, block)) = stored.split_first_chunk::<4>() else {
        return Err(CodecError::new("an lz4 payload shorter than its size".to_owned()));
    };
    let size = u32::from_le_bytes(*size) as usize;
    check_size(size, max_bytes)?;
    if size > block.len().saturating_mul(LZ4_MAX_RATIO) {
        return Err(CodecError::new(format!(
            "an lz4 payload of {} bytes claims {size} decompressed, more than lz4 can expand",
            block.len()
        )));
    }
    let mut out = vec![0; size];
    match lz4_flex::block::decompress_into(block, &mut out) {
        Ok(written) if written == size => Ok(out),
        Ok(written) => Err(CodecError::new(format!("an lz4 payload claims {size} bytes and holds {written}"))),
        Err(e) => Err(CodecError::new(format!("a corrupt lz4 payload: {e}"))),
    }
}

fn check_size(size: usize, max_bytes: usize) -> Result<(), CodecError> {
    if size > max_bytes {
        return Err(CodecError::new(format!(
            "a compressed payload claims {size} bytes, over max_value_bytes ({max_bytes})"
        )));
    }
    Ok(())
}

#[cfg(feature = "zstd")]
thread_local! {
    // A context costs more to set up than a small value costs to compress.
    static ZSTD_COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static ZSTD_DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// `None` if zstd failed, which then stores the payload as is.
#[cfg(feature = "zstd")]
fn zstd_pack(payload: &[u8]) -> Option<Vec<u8>> {
    ZSTD_COMPRESSOR.with(|cell| {
        let mut cell = cell.try_borrow_mut().ok()?;
        if cell.is_none() {
            *cell = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok()?);
        }
        // The frame records the content size, which `zstd_unpack` checks.
        cell.as_mut()?.compress(payload).ok()
    })
}

#[cfg(feature = "zstd")]
fn zstd_unpack(stored: &[u8], max_bytes: usize) -> Result<Vec<u8>, CodecError> {
    let corrupt = |why: &dyn std::fmt::Display| CodecError::new(format!("a corrupt zstd payload: {why}"));
    let size = match zstd::zstd_safe::get_frame_content_size(stored) {
        Ok(Some(size)) => usize::try_from(size).unwrap_or(usize::MAX),
        Ok(None) => return Err(corrupt(&"no content size")),
        Err(e) => return Err(corrupt(&format_args!("{e:?}"))),
    };
    check_size(size, max_bytes)?;
    // Decompression stops at the buffer's capacity: a frame that holds
    // more than it claims fails instead of growing it.
    let mut out = Vec::with_capacity(size);
    ZSTD_DECOMPRESSOR.with(|cell| {
        let mut cell = cell.try_borrow_mut().map_err(|e| corrupt(&e))?;
        if cell.is_none() {
            *cell = Some(zstd::bulk::Decompressor::new().map_err(|e| corrupt(&e))?);
        }
        let decompressor = cell.as_mut().ok_or_else(|| corrupt(&"no decompressor"))?;
        decompressor.decompress_to_buffer(stored, &mut out).map_err(|e| corrupt(&e))
    })?;
    if out.len() != size {
        return Err(corrupt(&format_args!("it claims {size} bytes and holds {}", out.len())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(len: usize) -> Vec<u8> {
        b"{\"id\":42,\"name\":\"blue widget\",\"price\":1999},".iter().copied().cycle().take(len).collect()
    }

    fn all() -> Vec<Compression> {
        #[allow(unused_mut)]
        let mut all = vec![Compression::Lz4];
        #[cfg(feature = "zstd")]
        all.push(Compression::Zstd);
        all
    }

    #[test]
    fn payloads_round_trip_above_the_threshold_and_stay_raw_below() {
        for compression in all() {
            let big = text(4096);
            let (packing, packed) = pack(&big, compression, 1024);
            assert_ne!(packing, Packing::Raw, "{compression:?}");
            assert!(packed.len() < big.len() / 4, "{compression:?}: {}", packed.len());
            assert_eq!(unpack(&packed, packing, big.len()).unwrap().as_ref(), &big[..]);
            let small = text(1023);
            let (packing, packed) = pack(&small, compression, 1024);
            assert_eq!((packing, packed.as_ref()), (Packing::Raw, &small[..]));
        }
        let (packing, _) = pack(&text(4096), Compression::None, 0);
        assert_eq!(packing, Packing::Raw);
    }

    #[test]
    fn incompressible_payloads_are_stored_as_they_are() {
        let noise: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
        for compression in all() {
            assert_eq!(pack(&noise, compression, 0).0, Packing::Raw, "{compression:?}");
        }
    }

    #[test]
    fn a_claimed_size_over_the_limit_is_refused_before_allocating() {
        // 4 GiB - 1 claimed by a few bytes: refused on the size alone.
        let mut crafted = u32::MAX.to_le_bytes().to_vec();
        crafted.extend_from_slice(&[0x1f, b'a', 0x01, 0x00]);
        let err = unpack(&crafted, Packing::Lz4, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("over max_value_bytes"), "{err}");
        // Within the limit, but more than those bytes can expand to.
        let err = unpack(&crafted, Packing::Lz4, usize::MAX).unwrap_err();
        assert!(err.to_string().contains("more than lz4 can expand"), "{err}");
        let big = text(4096);
        let (packing, packed) = pack(&big, Compression::Lz4, 0);
        let err = unpack(&packed, packing, 4095).unwrap_err();
        assert!(err.to_string().contains("over max_value_bytes"), "{err}");
    }

    #[test]
    fn corrupt_payloads_are_errors() {
        for compression in all() {
            let big = text(4096);
            let (packing, packed) = pack(&big, compression, 0);
            let mut corrupt = packed.into_owned();
            let end = corrupt.len();
            corrupt.truncate(end - 7);
            assert!(unpack(&corrupt, packing, usize::MAX).is_err(), "{compression:?}");
            assert!(unpack(b"", packing, usize::MAX).is_err(), "{compression:?}");
        }
    }

    #[cfg(feature = "zstd")]
    #[test]
    fn a_zstd_frame_claiming_a_huge_size_is_refused() {
        let big = text(4096);
        let (_, packed) = pack(&big, Compression::Zstd, 0);
        let err = unpack(&packed, Packing::Zstd, 4095).unwrap_err();
        assert!(err.to_string().contains("over max_value_bytes"), "{err}");
    }
}
