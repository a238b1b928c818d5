//! The public error type, and the internal faults the cache absorbs.

use std::fmt;

/// Everything that can go wrong in configuring or explicitly driving the
/// cache.
///
/// Cached calls never return this: a cache failure falls through to the
/// function. It comes from [`CacheBuilder::build`](crate::CacheBuilder::build),
/// [`init`](crate::init) and the write-path operations such as
/// [`invalidate`](crate::invalidate), which must tell their caller when they
/// did not reach Redis.
///
/// ```
/// use cache_runtime::{Cache, Error};
///
/// let err = Cache::builder().url("http://localhost").build().unwrap_err();
/// assert!(matches!(err, Error::InvalidUrl { .. }));
/// assert!(err.to_string().contains("http://localhost"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The Redis URL could not be parsed or uses an unsupported scheme.
    InvalidUrl {
        /// The URL as given, with any password masked.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// A builder setting is out of range.
    InvalidConfig(String),
    /// [`init`](crate::init) was called a second time.
    AlreadyInitialized,
    /// A process-wide operation ran before [`init`](crate::init).
    NotInitialized,
    /// Redis did not answer within the command deadline.
    Timeout,
    /// The circuit breaker is open after repeated failures; Redis was not tried.
    Unavailable,
    /// No connection to Redis could be made or kept.
    Connection(String),
    /// Redis answered with an error.
    Redis(String),
    /// A value or argument could not be encoded.
    Encode(String),
    /// [`forget`](crate::forget) or [`try_refresh`](crate::try_refresh) was
    /// given a future that is not a call of a
    /// `#[cached]` function.
    NotCached,
    /// A background operation ended before its work was done: a
    /// [`Purge`](crate::Purge) aborted, or its runtime shut down. What it
    /// did until then stays done.
    Stopped(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidUrl { url, reason } => write!(f, "invalid Redis URL `{url}`: {reason}"),
            Error::InvalidConfig(why) => write!(f, "invalid cache configuration: {why}"),
            Error::AlreadyInitialized => f.write_str("the process-wide cache is already initialized"),
            Error::NotInitialized => {
                f.write_str("the process-wide cache is not initialized: call cache_runtime::init first")
            }
            Error::Timeout => f.write_str("Redis did not answer within the command deadline"),
            Error::Unavailable => f.write_str("Redis is unavailable: the circuit breaker is open"),
            Error::Connection(why) => write!(f, "could not reach Redis: {why}"),
            Error::Redis(why) => write!(f, "Redis refused the command: {why}"),
            Error::Encode(why) => write!(f, "could not encode: {why}"),
            Error::NotCached => f.write_str("the future given is not a call of a #[cached] function"),
            Error::Stopped(why) => write!(f, "stopped before the end: {why}"),
        }
    }
}

impl std::error::Error for Error {}

/// Why one Redis operation did not happen; absorbed by cached calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fault {
    Timeout,
    BreakerOpen,
    Connection(String),
    /// The server is alive but refused: WRONGTYPE, OOM, READONLY, NOPERM.
    Server(String),
    /// A cluster refused a command because its slot is moving between
    /// nodes. Boxed: rare, and every future that holds a `Fault` pays for
    /// its size.
    SlotMigrating(Box<SlotMove>),
}

/// `TRYAGAIN` for several keys of a half-moved slot, or a redirection
/// redis-rs did not follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotMove {
    pub message: String,
    /// With an `ASK`, the node to ask: host and port.
    pub ask: Option<(String, u16)>,
}

impl From<Fault> for Error {
    fn from(fault: Fault) -> Self {
        match fault {
            Fault::Timeout => Error::Timeout,
            Fault::BreakerOpen => Error::Unavailable,
            Fault::Connection(why) => Error::Connection(why),
            Fault::Server(why) => Error::Redis(why),
            Fault::SlotMigrating(moving) => Error::Redis(moving.message),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redis operation failed, computing without the cache: {self:?}")
    }
}
