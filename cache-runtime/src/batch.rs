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
//! is idle, and no task outlives the runtime it was started on.

use crate::connection::Connections;
use crate::error::Fault;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Lookups on the wire at once before callers start to queue. One measured
/// best on 2 cores (`BENCH_ONLY=ours64 cargo bench --bench cache`): more
/// in flight means smaller batches.
const MAX_IN_FLIGHT: usize = 1;
/// The most lookups sent in one `MGET`.
const MAX_BATCH: usize = 128;

/// The values of one lookup's keys, in order: entry, then versions.
pub(crate) type Values = Vec<Option<Vec<u8>>>;

struct Queued {
    entry: String,
    versions: Arc<[String]>,
    reply: oneshot::Sender<Result<Values, Fault>>,
}

#[derive(Default)]
struct State {
    in_flight: usize,
    queue: Vec<Queued>,
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

/// Gives back an in-flight slot, and hands the queue to a flush, even when
/// the caller's future is dropped mid-flight.
struct Slot {
    batcher: Arc<Batcher>,
    connections: Arc<Connections>,
    /// Set when the slot's own lookup failed: the callers queued behind it
    /// get the same answer at once rather than a second wait on a sick Redis.
    failed: Option<Fault>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let batch = self.batcher.release_or_take();
        if batch.is_empty() {
            return;
        }
        match self.failed.take() {
            Some(fault) => {
                for queued in batch {
                    let _ = queued.reply.send(Err(fault.clone()));
                }
                // The slot went on as the flush: free it, failing any
                // callers that queued meanwhile too.
                while !self.batcher.fail_queue(&fault) {}
            }
            None => flush_elsewhere(self.batcher.clone(), self.connections.clone(), batch),
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
        let queued = {
            let Ok(mut state) = self.state.lock() else { return Box::pin(direct(connections, entry, versions)).await };
            if state.in_flight < MAX_IN_FLIGHT {
                state.in_flight += 1;
                None
            } else {
                let (reply, receiver) = oneshot::channel();
                state.queue.push(Queued { entry: entry.to_owned(), versions: versions.clone(), reply });
                Some(receiver)
            }
        };
        match queued {
            None => {
                let mut slot = Slot { batcher: self.clone(), connections: connections.clone(), failed: None };
                // Boxed: under load most lookups queue, and should not carry
                // the size of a direct round trip.
                let result = Box::pin(direct(connections, entry, versions)).await;
                if let Err(fault) = &result {
                    slot.failed = Some(fault.clone());
                }
                result
            }
            // No timer of our own: the lookup we queued behind has a deadline,
            // so does the flush, and a flush that goes away (its runtime shut
            // down) drops the reply, which wakes us to ask alone.
            Some(receiver) => match receiver.await {
                Ok(values) => values,
                Err(_) => Box::pin(direct(connections, entry, versions)).await,
            },
        }
    }

    /// Frees an in-flight slot, unless there is a queue: then the slot
    /// carries on as its flush.
    fn release_or_take(&self) -> Vec<Queued> {
        let Ok(mut state) = self.state.lock() else { return Vec::new() };
        if state.queue.is_empty() {
            state.in_flight = state.in_flight.saturating_sub(1);
            return Vec::new();
        }
        let take = state.queue.len().min(MAX_BATCH);
        state.queue.drain(..take).collect()
    }

    /// Fails everything queued with `fault`; once the queue is empty, frees
    /// the slot and returns true.
    fn fail_queue(&self, fault: &Fault) -> bool {
        let batch = self.release_or_take();
        let done = batch.is_empty();
        for queued in batch {
            let _ = queued.reply.send(Err(fault.clone()));
        }
        done
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.state.lock().map(|s| s.in_flight).unwrap_or(0)
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
fn flush_elsewhere(batcher: Arc<Batcher>, connections: Arc<Connections>, batch: Vec<Queued>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // No runtime to run on: the queued callers see their reply dropped
        // and ask alone. The slot is free again.
        drop(batch);
        let _ = batcher.release_or_take();
        return;
    };
    runtime.spawn(async move {
        let mut batch = batch;
        while !batch.is_empty() {
            send(&connections, batch).await;
            batch = batcher.release_or_take();
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
            for (i, (queued, positions)) in batch.into_iter().zip(version_positions).enumerate() {
                let mut own = Vec::with_capacity(1 + positions.len());
                own.push(values[i].take());
                own.extend(positions.iter().map(|&p| values[p].clone()));
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

    #[test]
    fn slots_are_released_without_a_queue() {
        let batcher = Batcher::default();
        batcher.state.lock().unwrap().in_flight = 2;
        assert!(batcher.release_or_take().is_empty());
        assert_eq!(batcher.in_flight(), 1);
    }

    #[test]
    fn a_finishing_slot_takes_the_queue() {
        let batcher = Batcher::default();
        {
            let mut state = batcher.state.lock().unwrap();
            state.in_flight = 2;
            for i in 0..3 {
                let (reply, _) = oneshot::channel();
                state.queue.push(Queued { entry: format!("k{i}"), versions: Arc::new([]), reply });
            }
        }
        assert_eq!(batcher.release_or_take().len(), 3);
        assert_eq!(batcher.in_flight(), 2, "the slot carries on as the flush");
        assert!(batcher.release_or_take().is_empty());
        assert_eq!(batcher.in_flight(), 1);
    }
}
