//! `clear`, `purge` and the local tier's byte budget, against real
//! redis-servers: on one server and (feature `cluster`) on a three-master
//! cluster, through `on_every_topology!`. The seeded randomized check of
//! `clear` with faults and several real processes is in `history.rs`
//! (its writes clear the cache now and then).

mod support;

use cache_runtime::{Cache, Error, Policy, PurgeRate, cached};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};
use support::{Topology, patient_cache, run};
use tokio::sync::Notify;

const DEADLINE: Duration = Duration::from_secs(60);

#[cached(ttl = 60, prefix = "orders", tags("customers"), skip(calls), cache = cache)]
async fn order(cache: &Cache, calls: &AtomicUsize, id: u64) -> String {
    calls.fetch_add(1, SeqCst);
    format!("order {id}")
}

#[cached(ttl = 60, prefix = "prices", skip(calls), cache = cache)]
async fn price(cache: &Cache, calls: &AtomicUsize, id: u64) -> u64 {
    calls.fetch_add(1, SeqCst);
    id * 100
}

#[cached(ttl = 60, prefix = "local_prices", local = true, skip(calls), cache = cache)]
async fn local_price(cache: &Cache, calls: &AtomicUsize, id: u64) -> u64 {
    calls.fetch_add(1, SeqCst) as u64 + id
}

/// A computation that waits for `release`, having said it `started`.
#[cached(ttl = 60, prefix = "slow", skip(gate), cache = cache)]
async fn slow(cache: &Cache, gate: &(Notify, Notify, AtomicUsize), id: u64) -> usize {
    let (started, release, calls) = gate;
    let n = calls.fetch_add(1, SeqCst);
    started.notify_one();
    release.notified().await;
    n + id as usize
}

fn cache(topology: &Topology, key_prefix: &str) -> Cache {
    patient_cache(&topology.url(), key_prefix).build().expect("valid cache settings")
}

/// Calls every function once for ids 0..n.
async fn fill(cache: &Cache, calls: &AtomicUsize, n: u64) {
    for id in 0..n {
        order(cache, calls, id).await;
        price(cache, calls, id).await;
    }
}

fn clear_makes_every_prefix_miss_in_every_cache_of_the_key_prefix(topology: &Topology) {
    run(DEADLINE, async {
        let (here, there, elsewhere) = (cache(topology, "app"), cache(topology, "app"), cache(topology, "app2"));
        let (calls, other_calls) = (AtomicUsize::new(0), AtomicUsize::new(0));
        fill(&here, &calls, 3).await;
        fill(&elsewhere, &other_calls, 3).await;
        fill(&there, &calls, 3).await;
        assert_eq!(calls.load(SeqCst), 6, "the other cache of the key prefix hits");

        there.clear().await.expect("clear");
        fill(&here, &calls, 3).await;
        assert_eq!(calls.load(SeqCst), 12, "every prefix, every tag, every id missed after the clear");
        fill(&here, &calls, 3).await;
        assert_eq!(calls.load(SeqCst), 12, "and is cached again");
        fill(&elsewhere, &other_calls, 3).await;
        assert_eq!(other_calls.load(SeqCst), 6, "another key prefix is untouched");
        assert!(here.stats().total.stale >= 6, "{:?}", here.stats().total);
        assert_eq!(here.stats().total.errors(), 0, "{:?}", here.stats().total);
    });
}

fn clear_reaches_another_caches_local_tier(topology: &Topology) {
    run(DEADLINE, async {
        let writer = cache(topology, "app");
        let reader = patient_cache(&topology.url(), "app").local(100).build().expect("cache");
        let calls = AtomicUsize::new(0);
        // Wait for the reader's channel: then its hits are local.
        let deadline = Instant::now() + Duration::from_secs(10);
        while reader.stats().total.local_hits == 0 {
            local_price(&reader, &calls, 1).await;
            assert!(Instant::now() < deadline, "the invalidation channel never came up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let before = local_price(&reader, &calls, 1).await;
        writer.clear().await.expect("clear");
        // One pub/sub hop (docs/CONSISTENCY.md); generously bounded here.
        let deadline = Instant::now() + Duration::from_secs(2);
        while local_price(&reader, &calls, 1).await == before {
            assert!(Instant::now() < deadline, "the reader's local tier kept serving what was cleared");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(reader.stats().local.entries, 1, "the tier dropped everything, then kept the new value");
    });
}

fn a_computation_that_began_before_a_clear_is_not_stored(topology: &Topology) {
    run(DEADLINE, async {
        let cache = cache(topology, "app");
        let gate = (Notify::new(), Notify::new(), AtomicUsize::new(0));
        let clear_meanwhile = async {
            gate.0.notified().await;
            cache.clear().await.expect("clear");
            gate.1.notify_one();
        };
        let (first, ()) = tokio::join!(slow(&cache, &gate, 1), clear_meanwhile);
        assert_eq!(first, 1, "the caller gets its own computation");
        gate.1.notify_one();
        assert_eq!(slow(&cache, &gate, 1).await, 2, "its value was not stored under the cleared version");
        // Refused by the script (a skipped write), or, for a fill nobody
        // waited for, written bound to the cleared version (a write),
        // which the read above did not take.
        let total = cache.stats().total;
        assert!(total.writes_skipped + total.writes >= 2, "{total:?}");
        gate.1.notify_one();
        assert_eq!(slow(&cache, &gate, 1).await, 2, "the second computation was stored");
    });
}

/// Someone else's keys that look like ours, with values that look like
/// entries.
const FOREIGN: [&str; 4] = ["app:orders:{orders}not-ours#x", "app:orders", "app:{orders}0123", "app:orders:{orders}"];

/// The entries of the cache with key prefix `app` (not `app:x`'s, not the
/// foreign keys): no version keys, locks or tombstones.
fn ours(topology: &Topology) -> Vec<String> {
    let all = support::entry_keys(&mut topology.conn(), "app:*");
    all.into_iter().filter(|k| !k.starts_with("app:x:") && !FOREIGN.contains(&k.as_str())).collect()
}

fn count(topology: &Topology, pattern: &str) -> usize {
    support::entry_keys(&mut topology.conn(), pattern).len()
}

fn purge_deletes_only_the_dead_entries_of_its_key_prefix(topology: &Topology) {
    run(DEADLINE, async {
        let (app, app2, nested) = (cache(topology, "app"), cache(topology, "app2"), cache(topology, "app:x"));
        let calls = AtomicUsize::new(0);
        fill(&app, &calls, 50).await;
        fill(&app2, &calls, 5).await;
        fill(&nested, &calls, 5).await;
        let mut conn = topology.conn();
        for key in FOREIGN {
            let _: () = redis::cmd("SET").arg(key).arg("RC2|b|1|1,2|x").query(&mut conn).expect("SET");
        }
        assert_eq!(cache_runtime::forget(price(&app, &calls, 1)).await, Ok(true));
        assert_eq!(ours(topology).len(), 99, "ours, less the forgotten one");

        app.clear().await.expect("clear");
        // Stored after the clear: live, and kept.
        order(&app, &calls, 1000).await;
        let purge = app.purge(PurgeRate::keys_per_second(100_000)).expect("a runtime");
        assert_eq!(purge.await, Ok(99), "every entry of app: but the live one");
        let left = ours(topology);
        assert!(left.len() == 1 && left[0].starts_with("app:orders:{orders}"), "only the live entry: {left:?}");
        assert_eq!(count(topology, "app2:*"), 10, "another cache's entries are untouched");
        assert_eq!(count(topology, "app:x:*"), 10, "a cache under a longer key prefix is untouched");
        for key in FOREIGN {
            let exists: bool = redis::cmd("EXISTS").arg(key).query(&mut conn).expect("EXISTS");
            assert!(exists, "{key} is not ours and stays");
        }
        for version in ["app:#all:{#all}#v", "app:orders:{orders}#v", "app:customers:{customers}#v"] {
            let exists: bool = redis::cmd("EXISTS").arg(version).query(&mut conn).expect("EXISTS");
            assert!(exists, "version key {version} stays");
        }
        // What purge reclaimed holds a tombstone for the rest of the entry's
        // life, never nothing (docs/CONSISTENCY.md); the prefix's version
        // and the forgotten entry's tombstone stay.
        let prices: Vec<String> = redis::cmd("KEYS").arg("app:prices:*").query(&mut conn).expect("KEYS");
        assert!(prices.len() > 2, "{prices:?}");
        for key in prices.iter().filter(|k| !k.ends_with("#v")) {
            let value: Vec<u8> = redis::cmd("GET").arg(key).query(&mut conn).expect("GET");
            assert!(value.starts_with(b"RC2|-|") && value.len() < 64, "{key} holds a small tombstone");
            let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut conn).expect("PTTL");
            assert!(ttl > 0, "{key}'s tombstone expires");
        }

        // Nothing came back: the live entry hits, the rest compute again.
        let before = calls.load(SeqCst);
        order(&app, &calls, 1000).await;
        fill(&app, &calls, 2).await;
        assert_eq!(calls.load(SeqCst), before + 4);
    });
}

fn purge_is_paced_and_outlives_its_handle(topology: &Topology) {
    run(DEADLINE, async {
        let app = cache(topology, "app");
        let calls = AtomicUsize::new(0);
        fill(&app, &calls, 100).await;
        app.clear().await.expect("clear");
        let (rate, batch) = (2_000, 50);
        let started = Instant::now();
        let purge = app.purge(PurgeRate::keys_per_second(rate).batch(batch)).expect("a runtime");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!purge.is_finished(), "200 keys at 2,000 a second take 100 ms at least");
        let examined_early = purge.examined();
        drop(purge);
        while !ours(topology).is_empty() {
            assert!(started.elapsed() < Duration::from_secs(20), "the dropped purge did not finish");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // SCAN returns what its COUNT covered, 200 keys in at least four
        // steps; each step but the last is followed by its share of the
        // rate, 25 ms.
        let least = Duration::from_millis(3 * 1000 * u64::from(batch) / u64::from(rate));
        assert!(started.elapsed() >= least, "{:?} for 200 keys at {rate}/s", started.elapsed());
        assert!(examined_early < 200, "it was under way, not done, when dropped: {examined_early}");

        fill(&app, &calls, 100).await;
        app.clear().await.expect("clear");
        let slow = app.purge(PurgeRate::keys_per_second(100).batch(10)).expect("a runtime");
        tokio::time::sleep(Duration::from_millis(50)).await;
        slow.abort();
        let stopped = slow.await;
        assert!(matches!(stopped, Err(Error::Stopped(_))), "an aborted purge says so: {stopped:?}");
        let left = ours(topology).len();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(ours(topology).len(), left, "and deletes nothing more");
        assert!(left > 150, "{left} of 200 entries left after 50 ms at 100 keys a second");
    });
}

fn a_second_purge_joins_the_running_one(topology: &Topology) {
    run(DEADLINE, async {
        let app = cache(topology, "app");
        let calls = AtomicUsize::new(0);
        fill(&app, &calls, 100).await;
        app.clear().await.expect("clear");
        let first = app.purge(PurgeRate::keys_per_second(100).batch(10)).expect("a runtime");
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Started on its own, this one would reclaim all 200 entries in
        // a few milliseconds.
        let second = app.purge(PurgeRate::keys_per_second(100_000)).expect("a runtime");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let left = ours(topology).len();
        assert!(left > 100, "{left} of 200 entries left: the second purge ran at its own rate");
        let (before, joined, after) = (first.examined(), second.examined(), first.examined());
        assert!(before <= joined && joined <= after, "one purge, counted once: {before}, {joined}, {after}");

        second.abort();
        let stopped = first.await;
        assert!(matches!(stopped, Err(Error::Stopped(_))), "the abort stopped the purge both follow: {stopped:?}");
        assert!(second.is_finished());
        // Once it ended, a purge starts afresh.
        let deleted = app.purge(PurgeRate::keys_per_second(100_000)).expect("a runtime").await.expect("purge");
        assert!(deleted > 0 && ours(topology).is_empty(), "{deleted} deleted, {} left", ours(topology).len());
    });
}

on_every_topology!(
    clear_makes_every_prefix_miss_in_every_cache_of_the_key_prefix,
    clear_reaches_another_caches_local_tier,
    a_computation_that_began_before_a_clear_is_not_stored,
    purge_deletes_only_the_dead_entries_of_its_key_prefix,
    purge_is_paced_and_outlives_its_handle,
    a_second_purge_joins_the_running_one,
);

#[test]
fn a_memory_only_clear_empties_the_tier() {
    run(DEADLINE, async {
        let cache = Cache::builder().build().expect("memory-only");
        let calls = AtomicUsize::new(0);
        fill(&cache, &calls, 10).await;
        fill(&cache, &calls, 10).await;
        assert_eq!(calls.load(SeqCst), 20);
        assert_eq!(cache.stats().local.entries, 20);
        cache.clear().await.expect("clear");
        assert_eq!(cache.stats().local, Default::default(), "entries and bytes given back");
        fill(&cache, &calls, 10).await;
        assert_eq!(calls.load(SeqCst), 40, "everything computed again");
        assert_eq!(cache.purge(PurgeRate::default()).expect("memory-only").await, Ok(0));
    });
}

#[test]
fn the_local_tier_stays_within_its_byte_budget() {
    run(DEADLINE, async {
        let budget = 256 << 10;
        let cache = Cache::builder().local_bytes(budget).build().expect("memory-only, in bytes");
        let policy = Policy::new("blobs").ttl(Duration::from_secs(60));
        let mut stored = 0u64;
        for n in 0..500u64 {
            // From a few bytes to 32 KiB.
            let len = ((n * 7919) % (32 << 10)) as usize;
            let value = cache.get_or_compute(&policy, &n, async { Ok::<_, ()>(vec![n as u8; len]) }).await;
            stored += value.map_or(0, |v| v.len() as u64);
        }
        let size = cache.stats().local;
        assert!(stored > 4 * budget, "the test stores more than the budget: {stored}");
        assert!(size.bytes <= budget && size.bytes > budget / 2, "{size:?} against {budget}");
        assert!(size.entries > 0 && size.entries < 500, "{size:?}");
        assert!(cache.stats().total.local_evictions > 0);
    });
}

#[test]
fn byte_budgets_out_of_range_are_refused_by_name() {
    for bytes in [0, 1023, (1 << 40) + 1, u64::MAX] {
        let refused = Cache::builder().local_bytes(bytes).build();
        match refused {
            Err(Error::InvalidConfig(why)) => assert!(why.contains("local_bytes must be from 1 KiB to 1 TiB"), "{why}"),
            other => panic!("{bytes}: {other:?}"),
        }
    }
    assert!(Cache::builder().url("redis://127.0.0.1:1").local(10).local_bytes(1 << 20).build().is_ok());
}

/// A purge asked for after a `clear` may join one started before it, whose
/// scan has already passed (as live) keys the clear has since made dead:
/// the join is owed a whole pass begun after it, or the handle would answer
/// `Ok` with those entries unreclaimed.
#[test]
fn a_purge_that_joins_one_begun_before_a_clear_reclaims_every_dead_entry() {
    let topology = Topology::server();
    run(DEADLINE, async {
        let app = cache(&topology, "app");
        let calls = AtomicUsize::new(0);
        fill(&app, &calls, 100).await;
        // Nothing is dead yet: this purge examines live entries and keeps them.
        let first = app.purge(PurgeRate::keys_per_second(400).batch(20)).expect("a runtime");
        let started = Instant::now();
        while first.examined() < 100 && started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(first.examined() >= 100 && !first.is_finished(), "the first purge is half way");
        app.clear().await.expect("clear");
        // Every one of the 200 entries is dead now: a purge asked for now
        // must reclaim them all.
        let second = app.purge(PurgeRate::keys_per_second(100_000)).expect("a runtime");
        let deleted = second.await.expect("purge");
        let left = ours(&topology).len();
        assert_eq!(left, 0, "a purge after the clear returned Ok({deleted}) with {left} dead entries left");
    });
}

/// A purge whose task sits on a runtime nobody drives (a current-thread
/// runtime kept for `block_on`, between two uses) is not joined from
/// another runtime: awaiting it there would never end.
#[test]
fn a_purge_does_not_join_one_stuck_on_an_idle_runtime() {
    let topology = Topology::server();
    let app = cache(&topology, "app");
    let live = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    live.block_on(async {
        let calls = AtomicUsize::new(0);
        fill(&app, &calls, 20).await;
        app.clear().await.expect("clear");
    });
    // Kept, but idle once its `block_on` returns.
    let idle = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    idle.block_on(async {
        drop(app.purge(PurgeRate::keys_per_second(1_000)).expect("a runtime"));
    });
    live.block_on(async {
        let purge = app.purge(PurgeRate::keys_per_second(100_000)).expect("a runtime");
        let ended = tokio::time::timeout(Duration::from_secs(10), purge).await;
        assert!(ended.is_ok(), "a purge on a live runtime did not end in 10 s: it joined one on an idle runtime");
        assert!(ours(&topology).is_empty(), "{} dead entries left", ours(&topology).len());
    });
    drop(idle);
}
