//! A circuit breaker, so a sick Redis costs callers no network time.
//!
//! Closed: every call may use Redis; consecutive failures are counted. After
//! `threshold` of them the breaker opens for `cool_down`: calls skip Redis
//! entirely (one atomic load and a clock read). Then exactly one call is let
//! through as a probe; its success closes the breaker, its failure reopens it.
//!
//! Admission is a guard: a probe whose caller gives up (a timeout, a
//! `select!`, a client that hung up) hands the probe to the next call when
//! dropped, instead of leaving the breaker open for good.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct Breaker {
    epoch: Instant,
    threshold: u32,
    cool_down: Duration,
    consecutive_failures: AtomicU32,
    /// Milliseconds since `epoch` until which the breaker is open; 0: closed.
    open_until_ms: AtomicU64,
    probe_in_flight: AtomicBool,
}

/// What the breaker lets a call do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Allowed,
    Probe,
    Rejected,
}

/// One call's admission, to be settled with [`Breaker::record_success`] or
/// [`Breaker::record_failure`]. A probe dropped unsettled is given back.
#[derive(Debug)]
pub(crate) struct Admission<'a> {
    breaker: &'a Breaker,
    kind: Kind,
}

impl Admission<'_> {
    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.kind == Kind::Probe {
            // Unsettled: nobody learned anything, so the next call probes.
            self.breaker.probe_in_flight.store(false, Relaxed);
        }
    }
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cool_down: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            threshold: threshold.max(1),
            cool_down,
            consecutive_failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            probe_in_flight: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        // Never 0, so 0 can mean "closed".
        millis(self.epoch.elapsed()).saturating_add(1)
    }

    /// When a breaker opened now reopens for a probe. Saturating: a
    /// cool-down past the clock's range opens it for good rather than
    /// panicking or wrapping round to "closed".
    fn reopen_at(&self) -> u64 {
        self.now_ms().saturating_add(millis(self.cool_down))
    }

    pub(crate) fn admit(&self) -> Admission<'_> {
        Admission { breaker: self, kind: self.admit_kind() }
    }

    /// An admission for a call that tries Redis whatever the breaker says.
    pub(crate) fn unguarded(&self) -> Admission<'_> {
        Admission { breaker: self, kind: Kind::Allowed }
    }

    fn admit_kind(&self) -> Kind {
        let open_until = self.open_until_ms.load(Relaxed);
        if open_until == 0 {
            return Kind::Allowed;
        }
        if self.now_ms() < open_until {
            return Kind::Rejected;
        }
        match self.probe_in_flight.compare_exchange(false, true, Relaxed, Relaxed) {
            Ok(_) => Kind::Probe,
            Err(_) => Kind::Rejected,
        }
    }

    /// Whether a probe is out now.
    pub(crate) fn probing(&self) -> bool {
        self.probe_in_flight.load(Relaxed)
    }

    pub(crate) fn record_success(&self, admission: Admission<'_>) {
        let mut admission = admission;
        // Settled here: the drop must not release a probe a later call took.
        admission.kind = Kind::Allowed;
        self.consecutive_failures.store(0, Relaxed);
        if self.open_until_ms.load(Relaxed) != 0 {
            self.open_until_ms.store(0, Relaxed);
            self.probe_in_flight.store(false, Relaxed);
        }
    }

    /// Returns true when this failure opened the breaker.
    pub(crate) fn record_failure(&self, admission: Admission<'_>) -> bool {
        let mut admission = admission;
        let kind = std::mem::replace(&mut admission.kind, Kind::Allowed);
        if kind == Kind::Probe {
            self.open_until_ms.store(self.reopen_at(), Relaxed);
            self.probe_in_flight.store(false, Relaxed);
            return false;
        }
        let failures = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if failures >= self.threshold && self.open_until_ms.load(Relaxed) == 0 {
            self.open_until_ms.store(self.reopen_at(), Relaxed);
            return true;
        }
        false
    }
}

/// Whole milliseconds, saturating at `u64::MAX` (`as` would truncate).
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_probes_once() {
        let b = Breaker::new(2, Duration::from_millis(30));
        assert_eq!(b.admit().kind(), Kind::Allowed);
        assert!(!b.record_failure(b.admit()));
        assert!(b.record_failure(b.admit()));
        assert_eq!(b.admit().kind(), Kind::Rejected);
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.admit();
        assert_eq!(probe.kind(), Kind::Probe);
        assert_eq!(b.admit().kind(), Kind::Rejected, "one probe at a time");
        b.record_failure(probe);
        assert_eq!(b.admit().kind(), Kind::Rejected, "a failed probe reopens");
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.admit();
        assert_eq!(probe.kind(), Kind::Probe);
        b.record_success(probe);
        assert_eq!(b.admit().kind(), Kind::Allowed);
    }

    #[test]
    fn a_dropped_probe_hands_the_probe_on() {
        let b = Breaker::new(1, Duration::from_millis(10));
        assert!(b.record_failure(b.admit()));
        std::thread::sleep(Duration::from_millis(20));
        let probe = b.admit();
        assert_eq!(probe.kind(), Kind::Probe);
        assert!(b.probing());
        drop(probe);
        assert!(!b.probing(), "a cancelled probe is given back");
        let probe = b.admit();
        assert_eq!(probe.kind(), Kind::Probe, "the next call probes at once");
        b.record_success(probe);
        assert_eq!(b.admit().kind(), Kind::Allowed);
    }

    #[test]
    fn a_settled_probe_does_not_release_the_next_one() {
        let b = Breaker::new(1, Duration::from_millis(10));
        assert!(b.record_failure(b.admit()));
        std::thread::sleep(Duration::from_millis(20));
        b.record_failure(b.admit());
        assert!(!b.probing());
        std::thread::sleep(Duration::from_millis(20));
        let probe = b.admit();
        assert_eq!(probe.kind(), Kind::Probe);
        // A rejected admission dropped meanwhile leaves the probe alone.
        drop(b.admit());
        assert!(b.probing());
        drop(probe);
    }

    #[test]
    fn a_huge_cool_down_keeps_the_breaker_open_without_overflowing() {
        let b = Breaker::new(1, Duration::MAX);
        assert!(b.record_failure(b.admit()));
        assert_eq!(b.admit().kind(), Kind::Rejected);
        let b = Breaker::new(1, Duration::from_millis(u64::MAX - 1));
        assert!(b.record_failure(b.admit()));
        assert_eq!(b.admit().kind(), Kind::Rejected);
    }
}
