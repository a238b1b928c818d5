//! How values are stored in Redis: compression and its threshold.

use super::CacheBuilder;
use crate::Compression;

impl CacheBuilder {
    /// How values of at least [`compress_threshold`](Self::compress_threshold)
    /// bytes (as encoded) are compressed before they are stored in Redis;
    /// default [`Compression::Lz4`]. A call site overrides it with
    /// `#[cached(compress = "...")]` or [`Policy::compress`](crate::Policy::compress).
    ///
    /// Only Redis holds compressed bytes: the local tier keeps values as
    /// encoded, so a local hit never decompresses. A value that compression
    /// does not make smaller is stored as it is. Entries written without
    /// compression (by an older release, or another setting) still read,
    /// and decompressing never allocates more than `max_value_bytes`.
    ///
    /// ```
    /// use cache_runtime::{Cache, Compression};
    ///
    /// let cache = Cache::builder()
    ///     .url("redis://127.0.0.1:6379")
    ///     .compression(Compression::Lz4)
    ///     .compress_threshold(512)
    ///     .build()?;
    /// # Ok::<(), cache_runtime::Error>(())
    /// ```
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Values shorter than this (as encoded, in bytes) are stored
    /// uncompressed: below it, compressing saves less memory than it costs
    /// time (docs/PERFORMANCE.md). Default 512 bytes; 0 compresses everything.
    ///
    /// ```
    /// let builder = cache_runtime::Cache::builder().compress_threshold(4096);
    /// assert!(builder.build().is_ok());
    /// ```
    pub fn compress_threshold(mut self, bytes: usize) -> Self {
        self.compress_threshold = bytes;
        self
    }
}
