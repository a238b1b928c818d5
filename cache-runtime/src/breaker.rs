//! A circuit breaker, so a sick Redis costs callers no network time.
//!
//! Closed: every call may use Redis; consecutive failures are counted. After
//! `threshold` of them the breaker opens for `cool_down`: calls skip Redis
//! entirely (one atomic load and a clock read). Then exactly one call is let
//! through as a probe; its success closes the breaker, its failure reopens it.
//!
//! Admission is a guard: a probe whose caller gives up (a timeout, a
//! `select!`, a client that hung up) hands the probe to the next call when
//! dropped, instead of leaving the breaker open for good. A caller may also
//! be parked: alive but no longer polled (a `select!` loser kept for
//! later). So a probe also lapses once it is older than any polled call
//! can take: the next call gets a probe of a new generation, and the old
//! probe's verdict, if it ever comes, is ignored.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct Breaker {
    epoch: Instant,
    threshold: u32,
    cool_down: Duration,
    /// How long a probe is out before the next call may probe instead.
    probe_lapses_after: u64,
    consecutive_failures: AtomicU32,
    /// Milliseconds since `epoch` until which the breaker is open; 0: closed.
    open_until_ms: AtomicU64,
    /// Locked only once the cool-down has passed, never on the closed path.
    probe: Mutex<Probe>,
}

/// The latest probe handed out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Probe {
    /// One per probe handed out: tells a lapsed probe from its successor.
    generation: u64,
    /// When it was handed out (as `open_until_ms`); 0: settled or given back.
    admitted_ms: u64,
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
    /// A probe's generation.
    generation: u64,
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
            self.breaker.release(self.generation);
        }
    }
}

impl Breaker {
    /// `probe_lapses_after`: the longest a call that is polled takes.
    pub(crate) fn new(threshold: u32, cool_down: Duration, probe_lapses_after: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            threshold: threshold.max(1),
            cool_down,
            probe_lapses_after: millis(probe_lapses_after),
            consecutive_failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            probe: Mutex::new(Probe::default()),
        }
    }

    fn now_ms(&self) -> u64 {
        // Never 0, so 0 can mean "closed".
        millis(self.epoch.elapsed()).saturating_add(1)
    }

    /// When a breaker opened at `now` reopens for a probe. Saturating: a
    /// cool-down past the clock's range opens it for good rather than
    /// panicking or wrapping round to "closed".
    fn reopen_at(&self, now: u64) -> u64 {
        now.saturating_add(millis(self.cool_down))
    }

    fn probe(&self) -> std::sync::MutexGuard<'_, Probe> {
        // Every write leaves the probe whole: a panic elsewhere cannot
        // have left it half written.
        self.probe.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `probe` is out and has not lapsed at `now`.
    fn live(&self, probe: &Probe, now: u64) -> bool {
        probe.admitted_ms != 0 && now < probe.admitted_ms.saturating_add(self.probe_lapses_after)
    }

    /// Whether the probe of `generation` is the latest and still out
    /// (lapsed or not: only its successor supersedes it).
    fn current(probe: &Probe, generation: u64) -> bool {
        probe.generation == generation && probe.admitted_ms != 0
    }

    /// Gives back the probe of `generation`, unless it was superseded.
    fn release(&self, generation: u64) {
        let mut probe = self.probe();
        if Self::current(&probe, generation) {
            probe.admitted_ms = 0;
        }
    }

    pub(crate) fn admit(&self) -> Admission<'_> {
        self.admit_at(self.now_ms())
    }

    /// An admission for a call that tries Redis whatever the breaker says.
    pub(crate) fn unguarded(&self) -> Admission<'_> {
        Admission { breaker: self, kind: Kind::Allowed, generation: 0 }
    }

    fn admit_at(&self, now: u64) -> Admission<'_> {
        let kind = match self.open_until_ms.load(Relaxed) {
            0 => Kind::Allowed,
            open_until if now < open_until => Kind::Rejected,
            _ => return self.admit_probe(now),
        };
        Admission { breaker: self, kind, generation: 0 }
    }

    /// The cool-down is over: a probe, unless one is out and not lapsed.
    fn admit_probe(&self, now: u64) -> Admission<'_> {
        let mut probe = self.probe();
        // Read again under the lock: a probe may have settled meanwhile.
        let kind = match self.open_until_ms.load(Relaxed) {
            0 => Kind::Allowed,
            open_until if now < open_until || self.live(&probe, now) => Kind::Rejected,
            _ => {
                probe.generation = probe.generation.wrapping_add(1);
                probe.admitted_ms = now;
                Kind::Probe
            }
        };
        Admission { breaker: self, kind, generation: probe.generation }
    }

    /// Whether a probe is out now.
    pub(crate) fn probing(&self) -> bool {
        self.live(&self.probe(), self.now_ms())
    }

    pub(crate) fn record_success(&self, admission: Admission<'_>) {
        let mut admission = admission;
        // Settled here: the drop must not release a probe a later call took.
        if std::mem::replace(&mut admission.kind, Kind::Allowed) == Kind::Probe {
            let mut probe = self.probe();
            if !Self::current(&probe, admission.generation) {
                // Superseded: its successor decides.
                return;
            }
            self.consecutive_failures.store(0, Relaxed);
            self.open_until_ms.store(0, Relaxed);
            probe.admitted_ms = 0;
            return;
        }
        self.consecutive_failures.store(0, Relaxed);
        if self.open_until_ms.load(Relaxed) != 0 {
            self.open_until_ms.store(0, Relaxed);
            // Closed: a probe still out decides nothing any more.
            self.probe().admitted_ms = 0;
        }
    }

    /// Returns true when this failure opened the breaker.
    pub(crate) fn record_failure(&self, admission: Admission<'_>) -> bool {
        self.record_failure_at(admission, self.now_ms())
    }

    fn record_failure_at(&self, admission: Admission<'_>, now: u64) -> bool {
        let mut admission = admission;
        if std::mem::replace(&mut admission.kind, Kind::Allowed) == Kind::Probe {
            let mut probe = self.probe();
            if Self::current(&probe, admission.generation) {
                // Reopened before the probe is given back: no call probes
                // in between.
                self.open_until_ms.store(self.reopen_at(now), Relaxed);
                probe.admitted_ms = 0;
            }
            return false;
        }
        let failures = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if failures >= self.threshold && self.open_until_ms.load(Relaxed) == 0 {
            self.open_until_ms.store(self.reopen_at(now), Relaxed);
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

    /// Longer than any of these tests runs: no probe lapses unless a test
    /// moves its own clock.
    const LAPSE: Duration = Duration::from_secs(3600);

    #[test]
    fn opens_after_threshold_then_probes_once() {
        let b = Breaker::new(2, Duration::from_millis(30), LAPSE);
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
        let b = Breaker::new(1, Duration::from_millis(10), LAPSE);
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
        let b = Breaker::new(1, Duration::from_millis(10), LAPSE);
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
        let b = Breaker::new(1, Duration::MAX, LAPSE);
        assert!(b.record_failure(b.admit()));
        assert_eq!(b.admit().kind(), Kind::Rejected);
        let b = Breaker::new(1, Duration::from_millis(u64::MAX - 1), LAPSE);
        assert!(b.record_failure(b.admit()));
        assert_eq!(b.admit().kind(), Kind::Rejected);
    }

    #[test]
    fn a_parked_probe_lapses_and_its_verdict_is_ignored() {
        let b = Breaker::new(1, Duration::from_millis(10), Duration::from_millis(100));
        assert!(b.record_failure_at(b.admit_at(1), 1));
        let parked = b.admit_at(20);
        assert_eq!(parked.kind(), Kind::Probe);
        assert_eq!(b.admit_at(119).kind(), Kind::Rejected, "out and not lapsed");
        let next = b.admit_at(120);
        assert_eq!(next.kind(), Kind::Probe, "lapsed: the next call probes");
        assert!(!b.record_failure_at(parked, 121), "a lapsed failure reopens nothing");
        assert_eq!(b.admit_at(122).kind(), Kind::Rejected, "its successor is still out");
        b.record_success(next);
        assert_eq!(b.admit_at(123).kind(), Kind::Allowed);
    }

    /// Random histories of admissions settled, dropped, parked (held, then
    /// settled long after or never) and a clock moving on: a probe is
    /// always to be had once the cool-down and the last probe's lapse are
    /// over, no two probes out are of one generation, and a superseded
    /// probe's verdict changes nothing. Prints its seed; `BREAKER_SEED=<seed>`
    /// replays one.
    #[test]
    fn random_histories_with_parked_probes_never_wedge_the_breaker() {
        use rand::{Rng, SeedableRng};
        let seed: u64 =
            std::env::var("BREAKER_SEED").ok().and_then(|seed| seed.parse().ok()).unwrap_or_else(rand::random);
        println!("BREAKER_SEED={seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for history in 0..300 {
            let lapse = rng.random_range(1..100);
            let b = Breaker::new(
                rng.random_range(1..4),
                Duration::from_millis(rng.random_range(0..50)),
                Duration::from_millis(lapse),
            );
            let (mut now, mut held, mut parked) = (1, Vec::new(), Vec::new());
            for step in 0..300 {
                let at = format!("BREAKER_SEED={seed}, history {history}, step {step}");
                let state =
                    |b: &Breaker| (b.open_until_ms.load(Relaxed), *b.probe(), b.consecutive_failures.load(Relaxed));
                match rng.random_range(0..10) {
                    0..=2 => held.push(b.admit_at(now)),
                    3 | 4 if !held.is_empty() => {
                        let admission: Admission<'_> = held.swap_remove(rng.random_range(0..held.len()));
                        if rng.random() {
                            b.record_success(admission);
                        } else {
                            b.record_failure_at(admission, now);
                        }
                    }
                    5 if !held.is_empty() => drop(held.swap_remove(rng.random_range(0..held.len()))),
                    6 if !held.is_empty() => parked.push(held.swap_remove(rng.random_range(0..held.len()))),
                    7 if !parked.is_empty() && rng.random_ratio(1, 5) => {
                        // A parked call polled again, long after.
                        let admission: Admission<'_> = parked.swap_remove(rng.random_range(0..parked.len()));
                        let superseded =
                            admission.kind() == Kind::Probe && !Breaker::current(&b.probe(), admission.generation);
                        let before = state(&b);
                        match rng.random_range(0..3) {
                            0 => b.record_success(admission),
                            1 => drop(b.record_failure_at(admission, now)),
                            _ => drop(admission),
                        }
                        if superseded {
                            assert_eq!(state(&b), before, "a superseded probe changed the breaker; {at}");
                        }
                    }
                    8 => now += rng.random_range(0..2 * lapse),
                    _ => {
                        // Every deadline waited out: the next call may use Redis.
                        let probe = *b.probe();
                        let until = b.open_until_ms.load(Relaxed).max(probe.admitted_ms.saturating_add(lapse));
                        now = now.max(until);
                        let admission = b.admit_at(now);
                        assert_ne!(admission.kind(), Kind::Rejected, "no probe after every deadline; {at}");
                        held.push(admission);
                    }
                }
                let mut generations: Vec<u64> = held
                    .iter()
                    .chain(&parked)
                    .filter(|admission| admission.kind() == Kind::Probe)
                    .map(|admission| admission.generation)
                    .collect();
                let probes = generations.len();
                generations.sort_unstable();
                generations.dedup();
                assert_eq!(generations.len(), probes, "two probes of one generation; {at}");
                let probe = *b.probe();
                assert!(
                    probe.admitted_ms == 0 || generations.contains(&probe.generation),
                    "the probe out is nobody's; {at}"
                );
            }
        }
    }
}
