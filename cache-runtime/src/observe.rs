//! What a call reports: one [`Event`] type, turned into the prefix's
//! counter, the `metrics` emission and the rate-limited warning in one
//! function ([`note`]), so the three never disagree.

use crate::error::Fault;
use crate::keys::KeyHash;
use crate::site::SiteRef;
use crate::stats::{Counters, add, bump};
use crate::warnings::{Cause, Warnings};
use std::fmt::Display;
use std::sync::atomic::AtomicU64;
#[cfg(feature = "metrics")]
use std::time::Instant;

/// What a call came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Answered from Redis.
    Hit,
    /// Answered from the local tier.
    LocalHit,
    /// Looked in Redis, found nothing usable, computed.
    Miss,
    /// Computed without asking Redis (unavailable, breaker open, no TTL).
    Bypass,
    /// Answered by another caller's computation in this process.
    Coalesced,
    /// Write-through: computed whatever was stored.
    Refresh,
    /// A background refresh-ahead.
    Renewal,
}

impl Outcome {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::LocalHit => "local_hit",
            Outcome::Miss => "miss",
            Outcome::Bypass => "bypass",
            Outcome::Coalesced => "coalesced",
            Outcome::Refresh => "refresh",
            Outcome::Renewal => "renewal",
        }
    }
}

/// Something worth counting that happened on the way to an outcome.
pub(crate) enum Event<'a> {
    /// A Redis operation failed; the call went on without it.
    Fault(&'a Fault),
    /// An entry was there but could not be used: foreign, another codec,
    /// or a payload that does not decode.
    Undecodable(&'a dyn Display),
    /// An argument or a value could not be encoded.
    Unencodable(&'a dyn Display),
    /// A value over `max_value_bytes`, returned but not stored.
    Oversize(&'a dyn Display),
    /// The function failed; the stale copy was returned instead.
    StaleServed(&'a dyn Display),
    /// An entry bound to an older namespace version.
    StaleVersion,
    LockWait,
    LockTimeout,
    Written {
        bytes: usize,
    },
    WriteSkipped,
    Read {
        bytes: usize,
    },
}

/// Counts `event` in `counters`, emits it and warns about it.
pub(crate) fn note(counters: &Counters, warnings: &Warnings, event: Event<'_>) {
    type Warning<'w> = Option<(Cause, &'w dyn Display)>;
    let (counter, metric, warning): (&AtomicU64, Option<&'static str>, Warning<'_>) = match &event {
        Event::Fault(fault) => {
            let (counter, kind) = match fault {
                Fault::Timeout => (&counters.timeouts, "timeout"),
                Fault::BreakerOpen => (&counters.breaker_rejections, "breaker_open"),
                Fault::Connection(_) => (&counters.connection_errors, "connection"),
                Fault::Server(_) | Fault::SlotMigrating(_) => (&counters.server_errors, "server"),
            };
            // An open breaker is warned about once, when it opens.
            let warning = (!matches!(fault, Fault::BreakerOpen)).then_some((Cause::Redis, *fault as &dyn Display));
            (counter, Some(kind), warning)
        }
        Event::Undecodable(why) => (&counters.decode_errors, Some("decode"), Some((Cause::Decode, *why))),
        Event::Unencodable(why) => (&counters.encode_errors, Some("encode"), Some((Cause::Encode, *why))),
        Event::Oversize(why) => (&counters.oversize, Some("oversize"), Some((Cause::Oversize, *why))),
        Event::StaleServed(why) => (&counters.stale_served, None, Some((Cause::Stale, *why))),
        Event::StaleVersion => (&counters.stale, None, None),
        Event::LockWait => (&counters.lock_waits, None, None),
        Event::LockTimeout => (&counters.lock_timeouts, None, None),
        Event::Written { bytes } => {
            add(&counters.bytes_written, *bytes as u64);
            (&counters.writes, None, None)
        }
        Event::WriteSkipped => (&counters.writes_skipped, None, None),
        Event::Read { bytes } => {
            add(&counters.bytes_read, *bytes as u64);
            return;
        }
    };
    bump(counter);
    #[cfg(feature = "metrics")]
    if let Some(kind) = metric {
        crate::metrics::error(kind);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = metric;
    if let Some((cause, message)) = warning {
        warnings.warn(cause, format_args!("{message}"));
    }
}

/// A call's observer: its prefix's counters, its `tracing` span and, with
/// the `metrics` feature, its latency.
pub(crate) struct Observer<'c> {
    pub site: SiteRef<'c>,
    pub span: tracing::Span,
    warnings: &'c Warnings,
    #[cfg(feature = "metrics")]
    prefix: &'c str,
    #[cfg(feature = "metrics")]
    started: Instant,
}

impl<'c> Observer<'c> {
    pub(crate) fn new(site: SiteRef<'c>, prefix: &'c str, warnings: &'c Warnings) -> Self {
        let span = tracing::debug_span!(
            target: "cache_runtime",
            "cached",
            prefix,
            key = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        Self {
            site,
            span,
            warnings,
            #[cfg(feature = "metrics")]
            prefix,
            #[cfg(feature = "metrics")]
            started: Instant::now(),
        }
    }

    /// The observer of a bulk call (`#[cached(batch(..))]`,
    /// `get_or_compute_many`): its span shows how many distinct items were
    /// asked for and, at the end, how many hit; its counters count per item.
    pub(crate) fn many(site: SiteRef<'c>, prefix: &'c str, warnings: &'c Warnings, items: usize) -> Self {
        let span =
            tracing::debug_span!(target: "cache_runtime", "cached_many", prefix, items, hits = tracing::field::Empty);
        Self {
            site,
            span,
            warnings,
            #[cfg(feature = "metrics")]
            prefix,
            #[cfg(feature = "metrics")]
            started: Instant::now(),
        }
    }

    pub(crate) fn key(&self, hash: KeyHash) {
        if !self.span.is_disabled() {
            let hex = hash.to_hex();
            self.span.record("key", String::from_utf8_lossy(&hex[..8]).as_ref());
        }
    }

    /// A call that cannot use the cache because of how its site or the
    /// cache is set up: counted every time, logged at error level once per
    /// site, since it will not fix itself.
    pub(crate) fn misconfigured(&self, why: &dyn Display) {
        bump(&self.site.counters.misconfigured);
        if self.site.reported.set(()).is_ok() {
            tracing::error!(target: "cache_runtime", "{why}");
        }
    }

    pub(crate) fn event(&self, event: Event<'_>) {
        note(&self.site.counters, self.warnings, event);
    }

    pub(crate) fn outcome(&self, outcome: Outcome) {
        let c = &self.site.counters;
        bump(match outcome {
            Outcome::Hit | Outcome::LocalHit => &c.hits,
            Outcome::Miss => &c.misses,
            Outcome::Bypass => &c.bypassed,
            Outcome::Coalesced => &c.coalesced,
            Outcome::Refresh => &c.refreshes,
            Outcome::Renewal => &c.renewals,
        });
        if outcome == Outcome::LocalHit {
            bump(&c.local_hits);
        }
        if matches!(outcome, Outcome::Miss | Outcome::Bypass | Outcome::Refresh | Outcome::Renewal) {
            bump(&c.computations);
        }
        // Recording on a disabled span still costs (more so with `tracing`'s
        // `log` feature, which many applications enable).
        if !self.span.is_disabled() {
            self.span.record("outcome", outcome.name());
        }
        #[cfg(feature = "metrics")]
        crate::metrics::outcome(self.prefix, outcome.name(), self.started.elapsed());
    }
}
