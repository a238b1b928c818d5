//! The miss path of a site that keeps missing: it takes the stampede lock
//! with a plain `SET NX PX` pipelined with its read (one round trip
//! instead of an `MGET` and the lock script), and keeps every promise of
//! the lock script: one computation per cold key across processes, no
//! stale answer after a write returned, no lock left behind by a caller
//! dropped mid-flight beyond the lock's own TTL.
//!
//! `MISS_SEED=<seed> cargo test --test miss_path` replays the randomized
//! test's schedule (the seed is printed on every run).

mod support;

use cache_runtime::{Cache, Policy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};
use support::RedisServer;
use tokio::sync::{Notify, oneshot};

fn reset_stats(server: &RedisServer) {
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut server.conn()).expect("resetstat");
}

fn lock_keys(server: &RedisServer) -> Vec<String> {
    redis::cmd("KEYS").arg("*#lock").query(&mut server.conn()).expect("KEYS")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

async fn value(cache: &Cache, policy: &Policy, key: u64) -> u64 {
    cache
        .get_or_compute(policy, &key, async move { Ok::<_, Infallible>(key * 10) })
        .await
        .unwrap_or_else(|e| match e {})
}

#[test]
fn a_site_that_keeps_missing_takes_the_lock_with_its_read() {
    let server = RedisServer::start();
    let cache = support::patient_cache(&server.url(), "keeps-missing").build().expect("cache");
    let policy = Policy::new("cold").ttl(Duration::from_secs(60));
    runtime().block_on(async {
        for key in 0..8 {
            assert_eq!(value(&cache, &policy, key).await, key * 10);
        }
        reset_stats(&server);
        for key in 100..200 {
            assert_eq!(value(&cache, &policy, key).await, key * 10);
        }
        let calls = server.command_calls();
        // No script but the lock's release: the lock and the read went as
        // `SET NX` and `MGET` in one round trip, the store as `SET NX` with
        // the release in another. Nobody waited for these values nor keeps
        // them locally, so the store read no versions back.
        assert_eq!(calls.get("evalsha"), None, "{calls:?}");
        assert_eq!(calls.get("eval"), Some(&100), "{calls:?}");
        assert_eq!(calls.get("mget"), Some(&100), "{calls:?}");
        assert_eq!(calls.get("set"), Some(&200), "{calls:?}");
        assert_eq!(cache.stats().total.writes, 108);

        // Hits: the first, still expecting a miss, takes and gives back
        // the lock; then the site reads first again.
        for key in 100..200 {
            assert_eq!(value(&cache, &policy, key).await, key * 10);
        }
        assert_eq!(cache.stats().total.hits, 100);
        reset_stats(&server);
        for key in 100..150 {
            assert_eq!(value(&cache, &policy, key).await, key * 10);
        }
        let calls = server.command_calls();
        assert_eq!(calls.get("set"), None, "hits take no lock once the site hits: {calls:?}");
        // The lock taken by the first hit is gone, released at once.
        let released = tokio::time::timeout(Duration::from_secs(5), async {
            while !lock_keys(&server).is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        assert!(released.await.is_ok(), "the lock a hit took was released: {:?}", lock_keys(&server));
    });
}

#[test]
fn callers_dropped_around_the_pipelined_lock_leave_no_lock_past_its_ttl() {
    let server = RedisServer::start();
    let lock_timeout = Duration::from_millis(800);
    let cache = support::patient_cache(&server.url(), "dropped").lock_timeout(lock_timeout).build().expect("cache");
    let policy = Arc::new(Policy::new("dropped").ttl(Duration::from_secs(60)));
    let mut rng = StdRng::seed_from_u64(rand::random());
    runtime().block_on(async {
        for key in 0..8 {
            value(&cache, &policy, 1_000_000 + key).await;
        }
        let computed = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for key in 0..300u64 {
            let (cache, policy, computed) = (cache.clone(), policy.clone(), computed.clone());
            // Dropped while the lock's round trip is on the wire, while
            // computing, or while storing.
            let after = Duration::from_micros(rng.random_range(0..3_000));
            tasks.push(tokio::spawn(async move {
                let call = cache.get_or_compute(&policy, &key, async {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    computed.fetch_add(1, SeqCst);
                    Ok::<_, Infallible>(key)
                });
                let _ = tokio::time::timeout(after, call).await;
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        // Callers on a runtime that shuts down mid-flight: their guards
        // cannot release anything, so their locks go by their TTL alone.
        let doomed = runtime();
        for key in 300..400u64 {
            let (cache, policy) = (cache.clone(), policy.clone());
            doomed.spawn(async move {
                let body = async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, Infallible>(key)
                };
                let _ = cache.get_or_compute(&policy, &key, body).await;
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Outside this runtime, so that no guard finds it to spawn on.
        std::thread::spawn(move || doomed.shutdown_background()).join().expect("shutdown");
        assert!(!lock_keys(&server).is_empty(), "the doomed callers held locks");
        // Every lock left has a TTL no longer than the lock timeout...
        let mut conn = server.conn();
        for lock in lock_keys(&server) {
            let ttl: i64 = redis::cmd("PTTL").arg(&lock).query(&mut conn).expect("pttl");
            assert!(ttl != -1 && ttl <= lock_timeout.as_millis() as i64, "{lock} has PTTL {ttl}");
        }
        // ...and none outlives it.
        tokio::time::sleep(lock_timeout + Duration::from_millis(200)).await;
        assert_eq!(lock_keys(&server), Vec::<String>::new());
        // Nothing is stuck: every key is served, without waiting for a lock.
        let waits = cache.stats().total.lock_waits;
        for key in 0..300u64 {
            let got = cache.get_or_compute(&policy, &key, async move { Ok::<_, Infallible>(key) }).await;
            assert_eq!(got.unwrap_or_else(|e| match e {}), key);
        }
        assert_eq!(cache.stats().total.lock_waits, waits);
    });
}

/// Rows whose truth only grows, and the floor each read must meet: the
/// newest version whose write had told the cache before the read began.
struct Rows {
    truth: Vec<AtomicU64>,
    floor: Vec<AtomicU64>,
    computed: Vec<AtomicU64>,
    stale: AtomicU64,
}

const ROWS: usize = 12;

impl Rows {
    fn new() -> Self {
        let column = || (0..ROWS).map(|_| AtomicU64::new(0)).collect();
        Rows { truth: column(), floor: column(), computed: column(), stale: AtomicU64::new(0) }
    }
}

/// Reads, cancelled reads, writes that invalidate, forget or write
/// through, and Redis faults (`CLIENT KILL`, `CLIENT PAUSE`), from two
/// caches (two processes' worth of sites and connections) on one server;
/// reads fill keys found empty without the script and store over
/// tombstones and old entries with it; every read is checked against its
/// floor. Then, with no fault, cold keys read by many callers
/// of both caches at once are computed once each.
#[test]
fn a_seeded_mix_of_misses_cancellations_writes_and_faults_serves_nothing_stale() {
    let seed = std::env::var("MISS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    println!("miss_path: seed {seed} (replay: MISS_SEED={seed} cargo test --test miss_path)");
    let server = RedisServer::start();
    let caches: Vec<Cache> = (0..2)
        .map(|_| {
            support::patient_cache(&server.url(), "mix")
                .lock_timeout(Duration::from_millis(500))
                .build()
                .expect("cache")
        })
        .collect();
    let rows = Arc::new(Rows::new());
    // Entries expire within the run, so keys go empty again and their next
    // misses fill without the script; tombstones and entries bound to old
    // versions take the script. (A tombstone lives as long as an entry,
    // far longer than any computation here.)
    let policies: Vec<Arc<Policy>> =
        (0..2).map(|_| Arc::new(Policy::new("rows").ttl(Duration::from_secs(2)).jitter(0.5))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    runtime().block_on(async {
        let mut tasks = Vec::new();
        for (c, cache) in caches.iter().enumerate() {
            for t in 0..6u64 {
                let (cache, policy, rows, stop) = (cache.clone(), policies[c].clone(), rows.clone(), stop.clone());
                // The same entries read without the stampede lock: their fills
                // go without a lock to release.
                let unlocked = Policy::new("rows").ttl(Duration::from_secs(2)).jitter(0.5).lock(false);
                let mut rng = StdRng::seed_from_u64(seed ^ (c as u64 * 1000 + t + 1).wrapping_mul(0x9E37_79B9));
                tasks.push(tokio::spawn(async move {
                    while !stop.load(SeqCst) {
                        let k = rng.random_range(0..ROWS);
                        let roll = rng.random_range(0..100);
                        if roll < 12 {
                            let version = rows.truth[k].fetch_add(1, SeqCst) + 1;
                            let told = match rng.random_range(0..3) {
                                0 => cache.invalidate("rows").await.is_ok(),
                                1 => cache.forget::<_, u64>(&policy, &(k as u64)).await.is_ok(),
                                // A write-through of what the row holds now.
                                _ => {
                                    let (rows, key) = (rows.clone(), k as u64);
                                    let write = cache.refresh(&policy, &key, async move {
                                        Ok::<_, Infallible>(rows.truth[k].load(SeqCst))
                                    });
                                    cache_runtime::try_refresh(write).await.1.is_ok()
                                }
                            };
                            if told {
                                rows.floor[k].fetch_max(version, SeqCst);
                            }
                            continue;
                        }
                        let floor = rows.floor[k].load(SeqCst);
                        let slow = Duration::from_micros(rng.random_range(0..2_000));
                        let rows2 = rows.clone();
                        let key = k as u64;
                        let reader = if t % 3 == 2 { &unlocked } else { &*policy };
                        let call = cache.get_or_compute(reader, &key, async move {
                            let version = rows2.truth[k].load(SeqCst);
                            tokio::time::sleep(slow).await;
                            Ok::<_, Infallible>(version)
                        });
                        let got = if roll < 30 {
                            let after = Duration::from_micros(rng.random_range(0..2_500));
                            tokio::time::timeout(after, call).await.ok()
                        } else {
                            Some(call.await)
                        };
                        if let Some(Ok(version)) = got
                            && version < floor
                        {
                            eprintln!("stale: row {k} read {version} below its floor {floor}");
                            rows.stale.fetch_add(1, SeqCst);
                        }
                    }
                }));
            }
        }
        let mut rng = StdRng::seed_from_u64(seed ^ 0xFA17);
        let mut conn = server.conn();
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(rng.random_range(50..250))).await;
            if rng.random_bool(0.5) {
                let _: redis::RedisResult<()> =
                    redis::cmd("CLIENT").arg("PAUSE").arg(rng.random_range(20..120)).arg("WRITE").query(&mut conn);
            } else {
                let _: redis::RedisResult<()> = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("normal")
                    .arg("SKIPME")
                    .arg("yes")
                    .query(&mut conn);
            }
        }
        stop.store(true, SeqCst);
        for task in tasks {
            task.await.expect("worker");
        }
        assert_eq!(rows.stale.load(SeqCst), 0, "stale reads (seed {seed})");
        // A locked fill releases its lock with `EVAL` (every other release
        // is an `EVALSHA`): the history did fill keys it found empty.
        let fills = server.command_calls().get("eval").copied().unwrap_or(0);
        println!("miss_path: {fills} locked fills");
        assert!(fills > 0, "no fill without the script (seed {seed})");

        // No fault now: both caches' sites expect misses (their last lookups
        // missed), and cold keys are computed once across both.
        for (c, cache) in caches.iter().enumerate() {
            for key in 0..8 {
                value(cache, &policies[c], 5_000 + 100 * c as u64 + key).await;
            }
        }
        let cold: Vec<u64> = (0..ROWS as u64).map(|k| 10_000 + k).collect();
        let mut callers = Vec::new();
        // All at once: each key's two leaders race for its lock.
        let start = Arc::new(tokio::sync::Barrier::new(cold.len() * 8));
        for &key in &cold {
            for c in 0..2 {
                for _ in 0..4 {
                    let (cache, policy, rows) = (caches[c].clone(), policies[c].clone(), rows.clone());
                    let start = start.clone();
                    callers.push(tokio::spawn(async move {
                        start.wait().await;
                        cache
                            .get_or_compute(&policy, &key, async move {
                                rows.computed[(key - 10_000) as usize].fetch_add(1, SeqCst);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                Ok::<_, Infallible>(key)
                            })
                            .await
                            .unwrap_or_else(|e| match e {})
                    }));
                }
            }
        }
        for (i, caller) in callers.into_iter().enumerate() {
            assert_eq!(caller.await.expect("caller"), cold[i / 8]);
        }
        let computed: Vec<u64> = rows.computed.iter().map(|c| c.load(SeqCst)).collect();
        assert_eq!(computed, vec![1; ROWS], "one computation per cold key (seed {seed})");
    });
}

static RENEWED: AtomicU64 = AtomicU64::new(0);

#[cache_runtime::cached(ttl = 2, prefix = "due", refresh_ahead = 0.5, cache = cache)]
async fn due_price(cache: Cache, id: u64) -> u64 {
    if id == 1 {
        RENEWED.fetch_add(1, SeqCst);
    }
    id * 10
}

/// A hit found by a lock taken with the read, due for refresh-ahead: the
/// renewal asks for the lock too, and must not find ours still held.
#[test]
fn a_hit_found_with_the_lock_still_renews_ahead() {
    let server = RedisServer::start();
    let cache = support::patient_cache(&server.url(), "renew").build().expect("cache");
    runtime().block_on(async {
        assert_eq!(due_price(cache.clone(), 1).await, 10);
        // The site now expects misses: its next call takes the lock first.
        for id in 100..108 {
            assert_eq!(due_price(cache.clone(), id).await, id * 10);
        }
        // Past half its TTL, the entry is due.
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        reset_stats(&server);
        assert_eq!(due_price(cache.clone(), 1).await, 10);
        // One MGET: the read went with the lock (a lookup would be a second).
        assert_eq!(server.command_calls().get("mget"), Some(&1));
        let renewed = tokio::time::timeout(Duration::from_secs(5), async {
            while RENEWED.load(SeqCst) < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        assert!(renewed.await.is_ok(), "the entry due was never renewed");
    });
}

/// An entry's header split around its times, which are the clock's: what
/// two stores of one value under one namespace version must share.
fn around_the_times(entry: &[u8]) -> (Vec<u8>, u64) {
    let bars: Vec<usize> = entry.iter().enumerate().filter(|(_, b)| **b == b'|').map(|(i, _)| i).collect();
    // `RC2|<codec>[<packing>]|<versions>|<stored>,<fresh until>|<payload>`
    let (start, end) = (bars[2] + 1, bars[3]);
    let times = std::str::from_utf8(&entry[start..end]).expect("ascii times");
    let (stored, fresh) = times.split_once(',').expect("two times");
    let life = fresh.parse::<u64>().expect("fresh until") - stored.parse::<u64>().expect("stored");
    ([&entry[..start], b"<times>", &entry[end..]].concat(), life)
}

/// A miss that found the key empty stores with `SET NX` and no script;
/// one that found a tombstone stores through `STORE`. A reader must not
/// be able to tell the two entries apart: same header, same versions, same
/// payload (raw and lz4-packed), same TTL; only the clock differs.
#[test]
fn a_fill_writes_the_bytes_the_script_writes() {
    let server = RedisServer::start();
    let cache = support::patient_cache(&server.url(), "same").build().expect("cache");
    let policy = Policy::new("same").ttl(Duration::from_secs(60)).lock(false);
    let mut conn = server.conn();
    runtime().block_on(async {
        for (value, head) in [("short".to_owned(), "RC2|b|"), ("packed ".repeat(400), "RC2|bl|")] {
            let size = value.len() as u64;
            let get = async |key: u64| {
                let value = value.clone();
                cache.get_or_compute(&policy, &(size, key), async move { Ok::<_, Infallible>(value) }).await
            };
            // The namespace's version is seeded (a script) by a first call.
            get(0).await.unwrap_or_else(|e| match e {});
            reset_stats(&server);
            assert_eq!(get(1).await.unwrap_or_else(|e| match e {}), value);
            let calls = server.command_calls();
            assert_eq!((calls.get("evalsha"), calls.get("eval")), (None, None), "a fill runs no script: {calls:?}");

            cache.forget::<_, String>(&policy, &(size, 2u64)).await.expect("tombstone");
            reset_stats(&server);
            assert_eq!(get(2).await.unwrap_or_else(|e| match e {}), value);
            let calls = server.command_calls();
            // (Twice the first time: `NOSCRIPT`, then loaded and sent again.)
            assert!(calls.contains_key("evalsha"), "over a tombstone, STORE: {calls:?}");

            let entries = support::entry_keys(&mut conn, "same:same:*");
            let entries: Vec<Vec<u8>> = entries
                .iter()
                .filter_map(|key| redis::cmd("GET").arg(key).query::<Option<Vec<u8>>>(&mut conn).expect("GET"))
                .filter(|bytes| bytes.starts_with(head.as_bytes()))
                .collect();
            assert_eq!(entries.len(), 3, "two fills and a store by script");
            let first = around_the_times(&entries[0]);
            assert_eq!(first.1, 60_000);
            for entry in &entries[1..] {
                assert_eq!(around_the_times(entry), first, "{:?}", String::from_utf8_lossy(&first.0));
            }
            for key in support::entry_keys(&mut conn, "same:same:*") {
                let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).expect("PTTL");
                assert!((55_000..=60_000).contains(&ttl), "{key}: PTTL {ttl}");
            }
            let _: () =
                redis::cmd("DEL").arg(support::entry_keys(&mut conn, "same:same:*")).query(&mut conn).expect("DEL");
        }
    });
}

/// A cold key whose computation is held at a gate: returns the call, and
/// waits until its body has read `truth`.
async fn held_miss(
    cache: &Cache,
    policy: &Arc<Policy>,
    key: u64,
    truth: &Arc<AtomicU64>,
) -> (tokio::task::JoinHandle<u64>, Arc<Notify>) {
    let gate = Arc::new(Notify::new());
    let (started, read) = oneshot::channel();
    let (cache, policy, truth, held) = (cache.clone(), policy.clone(), truth.clone(), gate.clone());
    let call = tokio::spawn(async move {
        let body = async move {
            let seen = truth.load(SeqCst);
            let _ = started.send(());
            held.notified().await;
            Ok::<_, Infallible>(seen)
        };
        cache.get_or_compute(&policy, &key, body).await.unwrap_or_else(|e| match e {})
    });
    read.await.expect("the body ran");
    (call, gate)
}

/// A forget or a write-through that lands while a cold key's computation
/// runs is not overwritten by that computation's fill: its `SET NX` finds
/// the tombstone or the new entry.
#[test]
fn a_write_during_a_fill_is_not_overwritten() {
    let server = RedisServer::start();
    let cache = support::patient_cache(&server.url(), "written").build().expect("cache");
    let policy = Arc::new(Policy::new("written").ttl(Duration::from_secs(60)));
    let mut conn = server.conn();
    runtime().block_on(async {
        for (key, refresh) in [(1u64, false), (2, true)] {
            let truth = Arc::new(AtomicU64::new(1));
            let (call, gate) = held_miss(&cache, &policy, key, &truth).await;
            truth.store(2, SeqCst);
            if refresh {
                let write = cache.refresh(&policy, &key, async { Ok::<_, Infallible>(2u64) });
                let (wrote, reached) = cache_runtime::try_refresh(write).await;
                assert_eq!((wrote.unwrap_or_else(|e| match e {}), reached.is_ok()), (2, true));
            } else {
                cache.forget::<_, u64>(&policy, &key).await.expect("forget");
            }
            // Tombstones included.
            let written: Vec<String> = redis::cmd("KEYS").arg("written:written:*").query(&mut conn).expect("KEYS");
            let written: Vec<String> =
                written.into_iter().filter(|key| !key.ends_with("#v") && !key.ends_with("#lock")).collect();
            assert_eq!(written.len(), 1, "{written:?}");
            let before: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(&written).query(&mut conn).expect("MGET");
            reset_stats(&server);
            gate.notify_one();
            assert_eq!(call.await.expect("call"), 1, "the computation returns what it read");
            let calls = server.command_calls();
            // The fill's release; its `SET NX` found the key taken, and
            // `STORE` (an `EVALSHA`) confirmed it was written since.
            assert_eq!(calls.get("eval"), Some(&1), "the store was a fill: {calls:?}");
            let after: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(&written).query(&mut conn).expect("MGET");
            assert_eq!(before, after, "the write's entry is untouched (refresh: {refresh})");
            let now = cache.get_or_compute(&policy, &key, async { Ok::<_, Infallible>(truth.load(SeqCst)) }).await;
            assert_eq!(now.unwrap_or_else(|e| match e {}), 2);
            let _: () = redis::cmd("DEL").arg(&written).query(&mut conn).expect("DEL");
        }
    });
}

/// A namespace version bumped while a cold key computes, silently (no
/// announcement, no write from this process: only the store can tell):
/// the fill lands bound to the old version, and its value is neither kept
/// in the local tier nor handed to the caller waiting in this process;
/// readers compute afresh.
#[test]
fn a_version_bumped_during_a_fill_is_neither_served_kept_nor_shared() {
    let server = RedisServer::start();
    let cache = support::patient_cache(&server.url(), "bumped").local(100).build().expect("cache");
    let other = support::patient_cache(&server.url(), "bumped").build().expect("cache");
    let policy = Arc::new(Policy::new("bumped").ttl(Duration::from_secs(60)).local_ttl(Duration::from_secs(60)));
    let mut conn = server.conn();
    runtime().block_on(async {
        let truth = Arc::new(AtomicU64::new(1));
        let (leader, gate) = held_miss(&cache, &policy, 7, &truth).await;
        // Joins the leader's flight; its body runs only if it must look again.
        let (waiter_started, waiter_leads) = oneshot::channel();
        let waiter_gate = Arc::new(Notify::new());
        let waiter = {
            let (cache, policy, truth, gate) = (cache.clone(), policy.clone(), truth.clone(), waiter_gate.clone());
            tokio::spawn(async move {
                let body = async move {
                    let _ = waiter_started.send(());
                    gate.notified().await;
                    Ok::<_, Infallible>(truth.load(SeqCst))
                };
                cache.get_or_compute(&policy, &7u64, body).await.unwrap_or_else(|e| match e {})
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        truth.store(2, SeqCst);
        let version_key = "bumped:bumped:{bumped}#v";
        let old: String = redis::cmd("GET").arg(version_key).query(&mut conn).expect("version");
        let _: u64 = redis::cmd("INCR").arg(version_key).query(&mut conn).expect("INCR");
        gate.notify_one();
        assert_eq!(leader.await.expect("leader"), 1, "the leader returns what it computed");
        let leads = tokio::time::timeout(Duration::from_secs(5), waiter_leads).await;
        assert!(matches!(leads, Ok(Ok(()))), "the waiter was handed the value stored under the old version");
        assert_eq!(cache.stats().local.entries, 0, "nothing kept locally");
        let entry = support::entry_keys(&mut conn, "bumped:bumped:*");
        let entry: Option<Vec<u8>> = redis::cmd("GET").arg(&entry).query(&mut conn).expect("GET");
        let entry = String::from_utf8_lossy(entry.as_deref().unwrap_or_default()).into_owned();
        assert!(entry.starts_with(&format!("RC2|b|{old},")), "the fill landed, bound to the old version: {entry:?}");
        // Another process's reader does not take it either (without the
        // lock, which the waiter holds now).
        let unlocked = Policy::new("bumped").ttl(Duration::from_secs(60)).lock(false);
        let read = other.get_or_compute(&unlocked, &7u64, async { Ok::<_, Infallible>(truth.load(SeqCst)) }).await;
        assert_eq!(read.unwrap_or_else(|e| match e {}), 2);
        waiter_gate.notify_one();
        assert_eq!(waiter.await.expect("waiter"), 2, "the waiter computed afresh");
        let again = cache.get_or_compute(&policy, &7u64, async { Ok::<_, Infallible>(0u64) }).await;
        assert_eq!(again.unwrap_or_else(|e| match e {}), 2);
    });
}

/// With memory full (`maxmemory`, `noeviction`) Redis refuses the lock a
/// site that keeps missing takes with its read, but reads work: an entry
/// another process filled is a hit. The refusal failed the pipeline, and
/// the call computed, on every call, since the site went on expecting
/// misses; a missing entry waited a poll for a lock nobody held.
#[test]
fn a_refused_lock_taken_with_the_read_still_hits() {
    let server = RedisServer::start();
    let cache = support::patient_cache(&server.url(), "refused").build().expect("cache");
    let other = support::patient_cache(&server.url(), "refused").build().expect("cache");
    let policy = Policy::new("cold").ttl(Duration::from_secs(60));
    let other_policy = Policy::new("cold").ttl(Duration::from_secs(60));
    runtime().block_on(async {
        assert_eq!(value(&other, &other_policy, 1_000).await, 10_000);
        for key in 0..8 {
            assert_eq!(value(&cache, &policy, key).await, key * 10);
        }
        let mut conn = server.conn();
        let () = redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").query(&mut conn).expect("");
        let () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("1").query(&mut conn).expect("maxmemory");
        let computed = AtomicBool::new(false);
        for _ in 0..3 {
            let answer = cache.get_or_compute(&policy, &1_000u64, async {
                computed.store(true, SeqCst);
                Ok::<_, Infallible>(0u64)
            });
            let got = answer.await.unwrap_or_else(|e| match e {});
            assert_eq!(got, 10_000, "{:?}", cache.stats().total);
        }
        assert!(!computed.load(SeqCst), "the current entry was served; {:?}", cache.stats().total);
        // A missing entry is computed at once: nobody holds the lock it
        // was refused, so there is nothing to wait for.
        assert_eq!(value(&cache, &policy, 2_000).await, 20_000);
        assert_eq!(cache.stats().total.lock_waits, 0, "{:?}", cache.stats().total);
        let () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("0").query(&mut conn).expect("maxmemory");
    });
}
