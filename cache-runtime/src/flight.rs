//! In-process coalescing: concurrent misses on one key run the function
//! once; the others await the leader's result in memory. And the claims
//! that keep refresh-ahead to one renewal per key.
//!
//! The leader holds a [`Leader`]; waiters hold a receiver. If the leader
//! finishes without a shareable result (an `Err`, a panic, its future
//! dropped), the channel closes and one waiter takes over at once.

use crate::keys::KeyHash;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What a finished leader hands its waiters.
#[derive(Debug, Clone)]
pub(crate) enum Shared {
    /// Encoded payload, good to return to anyone who asked.
    Value(Arc<Vec<u8>>),
    /// The result was computed from data older than an invalidation that
    /// happened meanwhile: waiters must look again.
    Stale,
}

/// A flight's progress, as its waiters see it.
#[derive(Debug, Clone)]
pub(crate) enum Progress {
    /// The leader is waiting for another process's computation.
    Waiting,
    /// The leader is computing.
    Computing,
    Done(Shared),
}

#[derive(Debug, Default)]
pub(crate) struct Flights {
    in_flight: Mutex<HashMap<String, watch::Receiver<Progress>>>,
}

pub(crate) enum Role<'a> {
    Leader(Leader<'a>),
    Waiter(watch::Receiver<Progress>),
}

/// The one computation of a key in this process. Dropping it without
/// [`Leader::finish`] releases the waiters to take over.
pub(crate) struct Leader<'a> {
    flights: &'a Flights,
    key: String,
    sender: watch::Sender<Progress>,
    /// The map no longer holds a receiver of this flight.
    closed: AtomicBool,
}

impl Flights {
    /// Leads the computation of `key`, or waits for the one under way.
    pub(crate) fn join(&self, key: &str) -> Role<'_> {
        let Ok(mut in_flight) = self.in_flight.lock() else {
            // A poisoned map only loses coalescing, never correctness.
            let (sender, _) = watch::channel(Progress::Waiting);
            return Role::Leader(Leader { flights: self, key: String::new(), sender, closed: AtomicBool::new(true) });
        };
        if let Some(receiver) = in_flight.get(key)
            && receiver.has_changed().is_ok()
        {
            return Role::Waiter(receiver.clone());
        }
        let (sender, receiver) = watch::channel(Progress::Waiting);
        in_flight.insert(key.to_owned(), receiver);
        Role::Leader(Leader { flights: self, key: key.to_owned(), sender, closed: AtomicBool::new(false) })
    }

    /// Keys being computed now.
    pub(crate) fn len(&self) -> usize {
        self.in_flight.lock().map(|m| m.len()).unwrap_or(0)
    }
}

impl Leader<'_> {
    /// Tells waiters the computation has started: they give it another
    /// lock timeout to finish.
    pub(crate) fn computing(&self) {
        self.sender.send_replace(Progress::Computing);
    }

    /// Whether anyone is waiting for this flight (the map holds one
    /// receiver until the flight is closed).
    pub(crate) fn has_waiters(&self) -> bool {
        self.sender.receiver_count() > usize::from(!self.closed.load(Relaxed))
    }

    /// Hands `shared` to every waiter.
    pub(crate) fn finish(self, shared: Shared) {
        self.sender.send_replace(Progress::Done(shared));
    }
}

impl Leader<'_> {
    /// Takes no more waiters: later callers of the key start a flight of
    /// their own. A leader closes its flight as soon as it has a result and
    /// before it checks whether that result may be shared, so that every
    /// waiter it hands a value to joined before the check (a caller that
    /// came after a write must not get a value computed before it).
    pub(crate) fn close(&self) {
        if self.closed.swap(true, Relaxed) {
            return;
        }
        if let Ok(mut in_flight) = self.flights.in_flight.lock()
            && in_flight.get(&self.key).is_some_and(|r| r.same_channel(&self.sender.subscribe()))
        {
            in_flight.remove(&self.key);
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        self.close();
    }
}

/// Waits until the leader computes (or is done): false when it gave up.
pub(crate) async fn started(receiver: &mut watch::Receiver<Progress>) -> bool {
    receiver.wait_for(|p| !matches!(p, Progress::Waiting)).await.is_ok()
}

/// Waits for the leader's result: `None` when it gave up (waiters should
/// try to lead).
pub(crate) async fn done(receiver: &mut watch::Receiver<Progress>) -> Option<Shared> {
    match receiver.wait_for(|p| matches!(p, Progress::Done(_))).await {
        Ok(progress) => match &*progress {
            Progress::Done(shared) => Some(shared.clone()),
            _ => None,
        },
        Err(_) => None,
    }
}

/// Keys with a refresh-ahead under way, or failed recently: until when no
/// other one starts.
#[derive(Debug, Default)]
pub(crate) struct Renewals(Mutex<HashMap<KeyHash, Instant>>);

impl Renewals {
    /// Claims `hash`; false if a renewal is under way or failed recently.
    pub(crate) fn claim(&self, hash: KeyHash) -> bool {
        let Ok(mut renewing) = self.0.lock() else { return false };
        let now = Instant::now();
        if renewing.get(&hash).is_some_and(|until| *until > now) {
            return false;
        }
        if renewing.len() > 1024 {
            renewing.retain(|_, until| *until > now);
        }
        // Far enough ahead to cover the renewal, which releases it.
        renewing.insert(hash, now + Duration::from_secs(86_400));
        true
    }

    /// Ends a claim; after a failure, no other renewal of the key starts
    /// for `back_off`.
    pub(crate) fn release(&self, hash: KeyHash, back_off: Option<Duration>) {
        if let Ok(mut renewing) = self.0.lock() {
            match back_off {
                Some(back_off) => renewing.insert(hash, Instant::now() + back_off),
                None => renewing.remove(&hash),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_many_waiters() {
        let flights = Flights::default();
        let Role::Leader(leader) = flights.join("k") else { panic!("first is leader") };
        let Role::Waiter(mut w1) = flights.join("k") else { panic!("second waits") };
        let Role::Waiter(mut w2) = flights.join("k") else { panic!("third waits") };
        leader.computing();
        assert!(started(&mut w1).await);
        leader.finish(Shared::Value(Arc::new(vec![7])));
        assert!(matches!(done(&mut w1).await, Some(Shared::Value(v)) if *v == [7]));
        assert!(started(&mut w2).await, "a finished flight has started");
        assert!(matches!(done(&mut w2).await, Some(Shared::Value(_))));
        assert_eq!(flights.len(), 0, "a finished flight leaves the map");
        assert!(matches!(flights.join("k"), Role::Leader(_)), "the next miss leads again");
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_its_waiters() {
        let flights = Flights::default();
        let leader = flights.join("k");
        let Role::Waiter(mut waiter) = flights.join("k") else { panic!("second waits") };
        drop(leader);
        assert!(!started(&mut waiter).await);
        assert!(done(&mut waiter).await.is_none());
        assert!(matches!(flights.join("k"), Role::Leader(_)), "a waiter can take over");
    }
}
