//! Batching concurrent lookups into one `MGET`, only under load.
//!
//! While fewer than [`MAX_IN_FLIGHT`] lookups are on the wire, a caller
//! sends its own `MGET`: a lone caller pays nothing for batching. Beyond
//! that, callers queue their keys; whoever finishes an in-flight lookup
//! sends everything queued as one `MGET` (version keys shared by several
//! callers are sent once) and hands each caller its values. One command
//! for many lookups spares the client's per-command work and the server's,
//! which is what bounds throughput when many tasks hit at once.
//!
//! Group commit rather than a background task: nothing runs when the cache
//! is idle, and no task outlives the runtime it was started on. A flush
//! whose runtime shuts down mid-flight gives its turn back as it is
//! dropped, and a queued caller waits a bounded time whatever happens: a
//! cache shared by several runtimes is never stuck behind a dead one.
//!
//! A turn is held by the caller's own future, which its owner may keep
//! without polling (a `select!` loser kept for later, a stream nobody
//! drives). A turn held longer than any polled lookup takes has lapsed:
//! the next caller takes it over, and the parked holder, if it ever runs
//! again, finds it gone and leaves the queue to the new holder.

use crate::connection::Connections;
use crate::error::Fault;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Lookups on the wire at once before callers start to queue. Two: while
/// one batch is on the wire, the callers of the other decode and queue
/// again, so Redis and the client work at the same time. (One measured
/// better when a flush gave its turn up between batches and batches were
/// small; since a flush waits for its callers to queue again, two measured
/// better on 2 cores: `BENCH_ONLY=hit64 cargo bench --bench cache`, median
/// ratio to the `cached` crate 1.27-1.85 against 1.17-1.39 with one.)
const MAX_IN_FLIGHT: usize = 2;
/// The most lookups sent in one `MGET`.
const MAX_BATCH: usize = 128;

/// The values of one lookup's keys, in order: entry, then versions.
pub(crate) type Values = Vec<Option<Vec<u8>>>;

struct Queued {
    entry: String,
    versions: Arc<[String]>,
    reply: oneshot::Sender<Result<Values, Fault>>,
}

/// A lookup on the wire: which turn, and since when.
struct Turn {
    id: u64,
    taken: Instant,
}

#[derive(Default)]
struct State {
    turns: Vec<Turn>,
    next_turn: u64,
    queue: Vec<Queued>,
}

impl State {
    /// A turn for a new lookup: a free one, or one held past `lapse`.
    fn take_turn(&mut self, lapse: Duration) -> Option<u64> {
        let (id, taken) = (self.next_turn, Instant::now());
        if self.turns.len() < MAX_IN_FLIGHT {
            self.turns.push(Turn { id, taken });
        } else {
            let lapsed = self.turns.iter_mut().find(|turn| taken.saturating_duration_since(turn.taken) > lapse)?;
            *lapsed = Turn { id, taken };
        }
        self.next_turn += 1;
        Some(id)
    }
}

#[derive(Default)]
pub(crate) struct Batcher {
    state: Mutex<State>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

/// Gives back an in-flight turn, and hands the queue to a flush, even when
/// the caller's future is dropped mid-flight.
struct InFlight {
    batcher: Arc<Batcher>,
    connections: Arc<Connections>,
    turn: u64,
    /// Set when the turn's own lookup failed: the callers queued behind it
    /// get the same answer at once rather than a second wait on a sick Redis.
    failed: Option<Fault>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let batch = self.batcher.release_or_take(self.turn);
        if batch.is_empty() {
            return;
        }
        match self.failed.take() {
            Some(fault) => {
                for queued in batch {
                    let _ = queued.reply.send(Err(fault.clone()));
                }
                // The turn went on as the flush: free it, failing any
                // callers that queued meanwhile too.
                while !self.batcher.fail_queue(self.turn, &fault) {}
            }
            None => flush_elsewhere(self.batcher.clone(), self.connections.clone(), self.turn, batch),
        }
    }
}

impl Batcher {
    /// Reads `keys` (an entry, then its version keys) with one `MGET`,
    /// alone or batched with concurrent lookups.
    pub(crate) async fn mget(
        self: &Arc<Self>,
        connections: &Arc<Connections>,
        entry: &str,
        versions: &Arc<[String]>,
    ) -> Result<Values, Fault> {
        let lapse = lapse(connections);
        let queued = {
            let Ok(mut state) = self.state.lock() else { return Box::pin(direct(connections, entry, versions)).await };
            match state.take_turn(lapse) {
                Some(turn) => Err(turn),
                None => {
                    let (reply, receiver) = oneshot::channel();
                    state.queue.push(Queued { entry: entry.to_owned(), versions: versions.clone(), reply });
                    Ok(receiver)
                }
            }
        };
        let mut receiver = match queued {
            Ok(receiver) => receiver,
            Err(turn) => return self.lead(turn, connections, entry, versions).await,
        };
        // The lookups we queued behind have deadlines, so does the flush,
        // and a flush that goes away (its runtime shut down) drops the
        // reply, which wakes us to ask alone. The timers are for anything
        // else: past `lapse` the turns ahead may be held by parked futures,
        // and we take one over; no call waits on the queue unbounded.
        let waited = match tokio::time::timeout(lapse, &mut receiver).await {
            Ok(waited) => waited,
            Err(_) => {
                let turn = self.state.lock().ok().and_then(|mut state| state.take_turn(lapse));
                if let Some(turn) = turn {
                    return self.lead(turn, connections, entry, versions).await;
                }
                let rest = queue_deadline(connections).saturating_sub(lapse);
                match tokio::time::timeout(rest, receiver).await {
                    Ok(waited) => waited,
                    Err(_) => return Err(Fault::Timeout),
                }
            }
        };
        match waited {
            Ok(values) => values,
            Err(_) => Box::pin(direct(connections, entry, versions)).await,
        }
    }

    /// Our own lookup, on `turn`; then the queue, if any, as its flush.
    async fn lead(
        self: &Arc<Self>,
        turn: u64,
        connections: &Arc<Connections>,
        entry: &str,
        versions: &Arc<[String]>,
    ) -> Result<Values, Fault> {
        let mut turn = InFlight { batcher: self.clone(), connections: connections.clone(), turn, failed: None };
        // Boxed: under load most lookups queue, and should not carry the
        // size of a direct round trip.
        let result = Box::pin(direct(connections, entry, versions)).await;
        if let Err(fault) = &result {
            turn.failed = Some(fault.clone());
        }
        result
    }

    /// Lookups on the wire (turns in use) and lookups queued for a batch.
    pub(crate) fn in_flight(&self) -> (u64, u64) {
        self.state.lock().map(|s| (s.turns.len() as u64, s.queue.len() as u64)).unwrap_or((0, 0))
    }

    /// Frees an in-flight turn, unless there is a queue: then the turn
    /// carries on as its flush. A turn that lapsed and was taken over is
    /// no longer ours: its new holder answers the queue.
    fn release_or_take(&self, turn: u64) -> Vec<Queued> {
        let Ok(mut state) = self.state.lock() else { return Vec::new() };
        let Some(at) = state.turns.iter().position(|t| t.id == turn) else { return Vec::new() };
        if state.queue.is_empty() {
            state.turns.swap_remove(at);
            return Vec::new();
        }
        // Each batch is a lookup of its own on the wire.
        state.turns[at].taken = Instant::now();
        let take = state.queue.len().min(MAX_BATCH);
        state.queue.drain(..take).collect()
    }

    /// Fails everything queued with `fault`; once the queue is empty, frees
    /// the turn and returns true.
    fn fail_queue(&self, turn: u64, fault: &Fault) -> bool {
        let batch = self.release_or_take(turn);
        let done = batch.is_empty();
        for queued in batch {
            let _ = queued.reply.send(Err(fault.clone()));
        }
        done
    }
}

/// The longest a queued lookup waits for its values: the lookup ahead of
/// it, then its own batch, each of which may try a second connection.
fn queue_deadline(connections: &Connections) -> Duration {
    connections.longest_round_trip().saturating_mul(4)
}

/// The longest a polled lookup holds its turn: a connection and a command,
/// twice (a second connection). Held longer, its holder is not polled.
fn lapse(connections: &Connections) -> Duration {
    connections.longest_round_trip().saturating_mul(2)
}

/// The in-flight turn a flush carries on with: freed when the flush is
/// done or dropped (its runtime shut down mid-flight), failing nobody:
/// callers still queued see their reply dropped and ask alone.
struct Flush {
    batcher: Arc<Batcher>,
    turn: u64,
    holds_turn: bool,
}

impl Flush {
    /// The next batch; none once the queue is empty, and then the turn is
    /// free.
    fn next(&mut self) -> Vec<Queued> {
        let batch = self.batcher.release_or_take(self.turn);
        self.holds_turn = !batch.is_empty();
        batch
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        if self.holds_turn {
            while !self.next().is_empty() {}
        }
    }
}

async fn direct(connections: &Connections, entry: &str, versions: &[String]) -> Result<Values, Fault> {
    let mut mget = redis::Cmd::with_capacity(2 + versions.len(), 64 * (2 + versions.len()));
    mget.arg("MGET").arg(entry).arg(versions);
    let values = connections.run(|conn| conn.query::<Values>(&mget)).await?;
    if values.len() == versions.len() + 1 {
        Ok(values)
    } else {
        Err(Fault::Server(format!("MGET returned {} values for {} keys", values.len(), versions.len() + 1)))
    }
}

/// Reads an entry, then its versions, one `GET` each: for a cluster slot
/// half moved to another node, which refuses multi-key reads. Each `GET`
/// follows its key to wherever it is now (sending `ASKING` with it when
/// redis-rs gave up), so hits go on during a resharding. A version read
/// after the entry is as good as one read with it: an entry is served only
/// when bound to the versions this call read.
pub(crate) async fn one_by_one(connections: &Connections, entry: &str, versions: &[String]) -> Result<Values, Fault> {
    let mut values = Vec::with_capacity(1 + versions.len());
    for key in std::iter::once(entry).chain(versions.iter().map(String::as_str)) {
        let mut get = redis::cmd("GET");
        get.arg(key);
        let value = match connections.run(|conn| conn.query::<Option<Vec<u8>>>(&get)).await {
            Err(Fault::SlotMigrating(moving)) => match &moving.ask {
                Some(node) => connections.run(|conn| conn.query_asking::<Option<Vec<u8>>>(node, &get)).await?,
                None => return Err(Fault::SlotMigrating(moving)),
            },
            value => value?,
        };
        values.push(value);
    }
    Ok(values)
}

/// Sends batches until the queue is empty, on a task of its own so that the
/// caller who finished first is not kept waiting.
fn flush_elsewhere(batcher: Arc<Batcher>, connections: Arc<Connections>, turn: u64, batch: Vec<Queued>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // No runtime to run on: the queued callers see their reply dropped
        // and ask alone, and so do any that queued meanwhile. The turn is
        // free again.
        drop(batch);
        drop(Flush { batcher, turn, holds_turn: true });
        return;
    };
    // Made before the task and moved in: dropped with the task even if it
    // never runs.
    let mut flush = Flush { batcher, turn, holds_turn: true };
    runtime.spawn(async move {
        let mut batch = batch;
        while !batch.is_empty() {
            send(&connections, batch).await;
            // The callers just answered ask again as soon as they run: let
            // them queue first (a yielded task resumes once its worker has
            // nothing else ready), so the next batch carries them all
            // rather than finding the queue empty, freeing the turn, and
            // leaving the first of them to go out alone.
            tokio::task::yield_now().await;
            batch = flush.next();
        }
    });
}

/// One `MGET` for every queued lookup; each gets its own values back.
/// Entries are sent once per lookup; version keys, which many lookups
/// share, once per batch (a linear scan: a batch names a few namespaces).
async fn send(connections: &Connections, batch: Vec<Queued>) {
    let mut keys: Vec<&str> = Vec::with_capacity(batch.len() * 2);
    keys.extend(batch.iter().map(|queued| queued.entry.as_str()));
    let entries = keys.len();
    let mut version_positions: Vec<Vec<usize>> = Vec::with_capacity(batch.len());
    for queued in &batch {
        let mut positions = Vec::with_capacity(queued.versions.len());
        for version in queued.versions.iter() {
            let position = match keys[entries..].iter().position(|k| *k == version.as_str()) {
                Some(found) => entries + found,
                None => {
                    keys.push(version);
                    keys.len() - 1
                }
            };
            positions.push(position);
        }
        version_positions.push(positions);
    }
    let mut mget = redis::Cmd::with_capacity(1 + keys.len(), 64 * (1 + keys.len()));
    mget.arg("MGET").arg(&keys);
    let result = connections.run(|conn| conn.query::<Values>(&mget)).await.and_then(|values| {
        if values.len() == keys.len() {
            Ok(values)
        } else {
            Err(Fault::Server(format!("MGET returned {} values for {} keys", values.len(), keys.len())))
        }
    });
    match result {
        Ok(mut values) => {
            let replies: Vec<Values> = version_positions
                .iter()
                .enumerate()
                .map(|(i, positions)| {
                    let mut own = Vec::with_capacity(1 + positions.len());
                    own.push(values[i].take());
                    own.extend(positions.iter().map(|&p| values[p].clone()));
                    own
                })
                .collect();
            // Sent in a tight loop, all built first: each send may wake an
            // idle worker (a syscall), and one that finds a few callers,
            // runs them and parks again is woken again by the next send.
            for (queued, own) in batch.into_iter().zip(replies) {
                // A caller that gave up has dropped its receiver: nothing to do.
                let _ = queued.reply.send(Ok(own));
            }
        }
        Err(fault) => {
            for queued in batch {
                let _ = queued.reply.send(Err(fault.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    fn with_turns(batcher: &Batcher, n: usize) -> Vec<u64> {
        let mut state = batcher.state.lock().unwrap();
        (0..n).map(|_| state.take_turn(LONG).expect("a free turn")).collect()
    }

    fn queue(batcher: &Batcher, n: usize) -> Vec<oneshot::Receiver<Result<Values, Fault>>> {
        let mut state = batcher.state.lock().unwrap();
        (0..n)
            .map(|i| {
                let (reply, receiver) = oneshot::channel();
                state.queue.push(Queued { entry: format!("k{i}"), versions: Arc::new([]), reply });
                receiver
            })
            .collect()
    }

    #[test]
    fn turns_are_released_without_a_queue() {
        let batcher = Batcher::default();
        let turns = with_turns(&batcher, 2);
        assert!(batcher.release_or_take(turns[0]).is_empty());
        assert_eq!(batcher.in_flight().0, 1);
    }

    #[test]
    fn a_finishing_turn_takes_the_queue() {
        let batcher = Batcher::default();
        let turns = with_turns(&batcher, 2);
        let _waiting = queue(&batcher, 3);
        assert_eq!(batcher.release_or_take(turns[1]).len(), 3);
        assert_eq!(batcher.in_flight().0, 2, "the turn carries on as the flush");
        assert!(batcher.release_or_take(turns[1]).is_empty());
        assert_eq!(batcher.in_flight().0, 1);
    }

    #[test]
    fn a_turn_held_past_its_lapse_is_taken_over() {
        let batcher = Batcher::default();
        let parked = with_turns(&batcher, MAX_IN_FLIGHT);
        assert_eq!(batcher.state.lock().unwrap().take_turn(LONG), None, "every turn is in use");
        let waiting = queue(&batcher, 2);
        std::thread::sleep(Duration::from_millis(2));
        let taken = batcher.state.lock().unwrap().take_turn(Duration::ZERO).expect("a lapsed turn");
        assert_eq!(batcher.in_flight(), (MAX_IN_FLIGHT as u64, 2), "taken over, not added");
        // The parked holder, polled again at last, finds its turn gone and
        // leaves the queue to the new holder.
        assert!(batcher.release_or_take(parked[0]).is_empty());
        assert_eq!(batcher.in_flight(), (MAX_IN_FLIGHT as u64, 2));
        assert_eq!(batcher.release_or_take(taken).len(), waiting.len());
        assert!(batcher.release_or_take(taken).is_empty());
        assert_eq!(batcher.in_flight(), (MAX_IN_FLIGHT as u64 - 1, 0));
    }

    #[test]
    fn a_dropped_flush_frees_its_turn_and_drops_the_queue() {
        let batcher = Arc::new(Batcher::default());
        let turn = with_turns(&batcher, 1)[0];
        let mut receiver = queue(&batcher, 1).remove(0);
        drop(Flush { batcher: batcher.clone(), turn, holds_turn: true });
        assert_eq!(batcher.in_flight(), (0, 0));
        assert!(receiver.try_recv().is_err(), "the queued caller is woken to ask alone");
        // A flush that finished gave its turn back already.
        let turn = with_turns(&batcher, 1)[0];
        drop(Flush { batcher: batcher.clone(), turn, holds_turn: false });
        assert_eq!(batcher.in_flight(), (1, 0));
    }
}
