//! A cache that never hurts, proven with real faults against real servers.
//!
//! Each scenario runs 64 concurrent callers over 200 keys, checking every
//! result against the value it must be, while the harness breaks Redis.
//! It asserts zero wrong values, a p99 latency during the fault under twice
//! the command timeout plus the body's own time, and a hit rate back above
//! 90% within a few seconds of recovery; and prints those figures
//! (`cargo test --test faults -- --nocapture`).

mod support;

use cache_runtime::{Cache, Counts, cached};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::RedisServer;

const CALLERS: usize = 64;
const KEYS: u32 = 200;
const BODY: Duration = Duration::from_millis(2);
const COMMAND_TIMEOUT: Duration = Duration::from_millis(50);

/// The scenarios measure latency: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    id: u32,
    name: String,
    tags: Vec<String>,
}

impl Product {
    fn expected(id: u32) -> Self {
        Product { id, name: format!("product {id}"), tags: vec![format!("t{}", id % 7), "catalog".into()] }
    }
}

#[cached(ttl = 600, prefix = "values", cache = cache)]
async fn value_of(cache: &Cache, id: u32) -> Product {
    tokio::time::sleep(BODY).await;
    Product::expected(id)
}

/// The same without a body's time, to see the cache's own cost.
#[cached(ttl = 600, prefix = "instant", cache = cache)]
async fn instant_value_of(cache: &Cache, id: u32) -> Product {
    Product::expected(id)
}

fn fault_cache(url: &str) -> Cache {
    Cache::builder()
        .url(url)
        .key_prefix("faults")
        .command_timeout(COMMAND_TIMEOUT)
        .connect_timeout(COMMAND_TIMEOUT)
        .build()
        .expect("valid cache settings")
}

struct Call {
    started: Instant,
    latency: Duration,
    right: bool,
}

async fn caller(cache: Cache, stop: Arc<AtomicBool>, seed: u32) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut id = seed;
    while !stop.load(SeqCst) {
        // Full period mod 200 (Hull-Dobell): every key is visited.
        id = (id * 21 + 13) % KEYS;
        let started = Instant::now();
        let product = value_of(&cache, id).await;
        calls.push(Call { started, latency: started.elapsed(), right: product == Product::expected(id) });
    }
    calls
}

struct Report {
    calls: usize,
    wrong: usize,
    during: Vec<Duration>,
    hit_rate_after: f64,
    stats: Counts,
}

impl Report {
    fn p(&self, q: f64) -> Duration {
        self.during.get(((self.during.len() as f64 - 1.0) * q) as usize).copied().unwrap_or_default()
    }

    fn check(&self, name: &str) {
        println!(
            "{name:<28} calls {:>6}  wrong {}  during fault: {:>5} calls, p50 {:>7.1?} p99 {:>7.1?} max {:>7.1?}  \
             hit rate after recovery {:>5.1}%",
            self.calls,
            self.wrong,
            self.during.len(),
            self.p(0.5),
            self.p(0.99),
            self.during.last().copied().unwrap_or_default(),
            self.hit_rate_after * 100.0
        );
        assert_eq!(self.wrong, 0, "{name}: wrong values returned");
        assert!(!self.during.is_empty(), "{name}: no calls during the fault");
        let bound = 2 * COMMAND_TIMEOUT + BODY;
        assert!(self.p(0.99) < bound, "{name}: p99 {:?} over {bound:?}; {:?}", self.p(0.99), self.stats);
    }

    fn check_recovery(&self, name: &str) {
        assert!(
            self.hit_rate_after > 0.9,
            "{name}: hit rate {:.3} after recovery; {:?}",
            self.hit_rate_after,
            self.stats
        );
    }
}

fn hit_rate_between(before: &Counts, after: &Counts) -> f64 {
    let served = (after.hits + after.coalesced) - (before.hits + before.coalesced);
    let computed = (after.misses + after.bypassed) - (before.misses + before.bypassed);
    served as f64 / (served + computed).max(1) as f64
}

/// Runs the load, warms it for a second, applies `fault` on this thread
/// (it returns when Redis has recovered), then measures recovery.
fn scenario(cache: Cache, fault: impl FnOnce()) -> Report {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> =
        (0..CALLERS).map(|i| runtime.spawn(caller(cache.clone(), stop.clone(), i as u32 * 7919))).collect();
    std::thread::sleep(Duration::from_secs(1));
    let fault_started = Instant::now();
    fault();
    let recovered = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let settled = cache.stats().total;
    std::thread::sleep(Duration::from_secs(1));
    let end = cache.stats().total;
    stop.store(true, SeqCst);
    let calls: Vec<Call> = runtime.block_on(async {
        let deadline = Duration::from_secs(10);
        let mut all = Vec::new();
        for caller in callers {
            all.extend(
                tokio::time::timeout(deadline, caller).await.expect("a caller hung").expect("a caller panicked"),
            );
        }
        all
    });
    let mut during: Vec<Duration> =
        calls.iter().filter(|c| c.started >= fault_started && c.started <= recovered).map(|c| c.latency).collect();
    during.sort();
    Report {
        calls: calls.len(),
        wrong: calls.iter().filter(|c| !c.right).count(),
        during,
        hit_rate_after: hit_rate_between(&settled, &end),
        stats: end,
    }
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn redis_killed_and_restarted_on_the_same_port() {
    let _serial = serial();
    let mut server = RedisServer::start();
    let cache = fault_cache(&server.url());
    let report = scenario(cache, || {
        server.kill();
        std::thread::sleep(Duration::from_secs(1));
        server.restart();
    });
    report.check("SIGKILL, restart");
    report.check_recovery("SIGKILL, restart");
    assert!(report.stats.connection_errors > 0 && report.stats.breaker_rejections > 0, "{:?}", report.stats);
}

#[test]
fn redis_frozen_for_two_seconds() {
    let _serial = serial();
    let server = RedisServer::start();
    let cache = fault_cache(&server.url());
    let report = scenario(cache, || {
        server.freeze();
        std::thread::sleep(Duration::from_secs(2));
        server.resume();
    });
    report.check("SIGSTOP 2 s, SIGCONT");
    report.check_recovery("SIGSTOP 2 s, SIGCONT");
    assert!(report.stats.timeouts > 0 && report.stats.breaker_rejections > 0, "{:?}", report.stats);
}

#[test]
fn redis_out_of_memory_degrades_to_read_only_caching() {
    let _serial = serial();
    let server = RedisServer::start();
    let cache = fault_cache(&server.url());
    let mut admin = server.conn();
    let report = scenario(cache, || {
        // Every entry goes stale, so callers must write, and writes fail.
        let _: i64 = redis::cmd("INCR").arg("faults:values:{values}#v").query(&mut admin).unwrap();
        let filler = vec![b'x'; 2 << 20];
        let _: () = redis::cmd("SET").arg("filler").arg(filler).query(&mut admin).unwrap();
        let _: () = redis::cmd("CONFIG").arg(&["SET", "maxmemory-policy", "noeviction"]).query(&mut admin).unwrap();
        let _: () = redis::cmd("CONFIG").arg(&["SET", "maxmemory", "1mb"]).query(&mut admin).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        let _: () = redis::cmd("CONFIG").arg(&["SET", "maxmemory", "0"]).query(&mut admin).unwrap();
        let _: () = redis::cmd("DEL").arg("filler").query(&mut admin).unwrap();
    });
    report.check("maxmemory 1mb, noeviction");
    report.check_recovery("maxmemory 1mb, noeviction");
    assert!(report.stats.server_errors > 0, "OOM errors were seen and absorbed: {:?}", report.stats);
}

#[test]
fn garbage_hashes_and_bogus_lengths_are_misses_that_heal() {
    let _serial = serial();
    let server = RedisServer::start();
    let cache = fault_cache(&server.url());
    let mut admin = server.conn();
    let report = scenario(cache, || {
        let keys = support::entry_keys(&mut admin, "faults:values:*");
        assert!(keys.len() > 100, "warm-up stored entries: {}", keys.len());
        for (i, key) in keys.iter().enumerate() {
            match i % 3 {
                0 => {
                    let garbage: Vec<u8> = (0..64).map(|b| (b * 37 + i) as u8).collect();
                    let _: () = redis::cmd("SET").arg(key).arg(garbage).query(&mut admin).unwrap();
                }
                1 => {
                    let _: () = redis::cmd("DEL").arg(key).query(&mut admin).unwrap();
                    let _: () = redis::cmd("HSET").arg(key).arg("field").arg("value").query(&mut admin).unwrap();
                }
                _ => {
                    // Keep the (current) header, replace the payload with a
                    // length prefix that claims 2^62 elements.
                    let entry: Vec<u8> = redis::cmd("GET").arg(key).query(&mut admin).unwrap();
                    let header_end = entry.iter().enumerate().filter(|(_, b)| **b == b'|').nth(2).unwrap().0 + 1;
                    let mut bogus = entry[..header_end].to_vec();
                    bogus.extend_from_slice(&[0x2a, 0xff]);
                    bogus.extend_from_slice(&(1u64 << 62).to_le_bytes());
                    let _: () = redis::cmd("SET").arg(key).arg(bogus).query(&mut admin).unwrap();
                }
            }
        }
    });
    report.check("garbage, hashes, bogus length");
    report.check_recovery("garbage, hashes, bogus length");
    assert!(report.stats.decode_errors > 0, "{:?}", report.stats);
    let healed = support::entry_keys(&mut admin, "faults:values:*");
    for key in healed {
        let kind: String = redis::cmd("TYPE").arg(&key).query(&mut admin).unwrap();
        assert_eq!(kind, "string", "{key} was overwritten by a real entry");
    }
}

#[test]
fn every_client_connection_dropped() {
    let _serial = serial();
    let server = RedisServer::start();
    let cache = fault_cache(&server.url());
    let mut admin = server.conn();
    let report = scenario(cache, || {
        let _: i64 = redis::cmd("CLIENT").arg(&["KILL", "TYPE", "normal"]).query(&mut admin).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    });
    report.check("CLIENT KILL TYPE normal");
    report.check_recovery("CLIENT KILL TYPE normal");
}

/// A loopback listener that accepts connections and never answers.
fn blackhole() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            counter.fetch_add(1, SeqCst);
            held.push(stream);
            // Drain what clients send, never reply.
            if let Some(last) = held.last_mut() {
                let _ = last.set_nonblocking(true);
                let _ = last.read(&mut [0u8; 1024]);
            }
        }
    });
    (url, accepted)
}

#[test]
fn a_blackhole_costs_one_timeout_then_nothing() {
    let _serial = serial();
    let (url, accepted) = blackhole();
    let cache = fault_cache(&url);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        // 64 concurrent first calls: bounded by one timeout, not 64 in a row.
        let started = Instant::now();
        let tasks: Vec<_> = (0..CALLERS as u32)
            .map(|id| {
                let cache = cache.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    (value_of(&cache, id).await == Product::expected(id), t.elapsed())
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for task in tasks {
            let (right, latency) = task.await.unwrap();
            assert!(right);
            latencies.push(latency);
        }
        let wave = started.elapsed();
        latencies.sort();
        let bound = 2 * COMMAND_TIMEOUT + BODY;
        println!(
            "{:<28} first wave of {CALLERS}: wall {wave:.1?}, p99 {:.1?}, max {:.1?}; connections accepted {}",
            "blackhole listener",
            latencies[latencies.len() * 99 / 100],
            latencies[latencies.len() - 1],
            accepted.load(SeqCst)
        );
        assert!(latencies[latencies.len() - 1] < bound, "a caller queued behind others' timeouts");
        assert!(wave < bound + Duration::from_millis(50), "the wave took {wave:?}");

        // Then the breaker is open: calls cost no network time. (The exact
        // overhead is a benchmark's job; this only bounds it loosely.)
        let mut open = Vec::new();
        for id in 0..200 {
            let t = Instant::now();
            assert_eq!(instant_value_of(&cache, id).await, Product::expected(id));
            open.push(t.elapsed());
        }
        open.sort();
        let stats = cache.stats().total;
        println!(
            "{:<28} breaker open: 200 calls, p50 {:.1?}, p99 {:.1?} per call; {stats:?}",
            "", open[100], open[197]
        );
        assert!(stats.breaker_rejections > 0, "{stats:?}");
        assert!(open[100] < Duration::from_millis(1), "overhead with the breaker open: {:?}", open[100]);
    });
}

/// A site whose lookups all missed asks for the lock before reading.
#[cached(ttl = 600, prefix = "cold", cache = cache)]
async fn cold_value_of(cache: &Cache, id: u32) -> Product {
    Product::expected(id)
}

#[test]
fn with_the_breaker_open_a_miss_leaves_no_task_behind() {
    let _serial = serial();
    let mut server = RedisServer::start();
    let cache = fault_cache(&server.url());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        // Cold keys: the site learns to ask for the lock first.
        for id in 0..16 {
            assert_eq!(cold_value_of(&cache, id).await, Product::expected(id));
        }
        server.kill();
        let mut id = 1_000;
        while cache.stats().total.breaker_rejections == 0 {
            assert_eq!(cold_value_of(&cache, id).await, Product::expected(id));
            id += 1;
            assert!(id < 100_000, "the breaker never opened: {:?}", cache.stats().total);
        }
        // A lock request the breaker refused took no lock: nothing is left
        // to release. (Each release task would live 100 ms, so a storm of
        // misses would pile them up.)
        let metrics = tokio::runtime::Handle::current().metrics();
        let before = metrics.num_alive_tasks();
        for id in 200_000..200_200 {
            assert_eq!(cold_value_of(&cache, id).await, Product::expected(id));
        }
        let rejected = cache.stats().total.breaker_rejections;
        let alive = metrics.num_alive_tasks();
        assert!(rejected >= 200, "the calls met the open breaker: {:?}", cache.stats().total);
        assert!(alive <= before + 10, "{alive} tasks alive after 200 refused misses, {before} before");
    });
}

#[test]
fn a_wrong_password_is_a_clear_error_and_calls_still_work() {
    let _serial = serial();
    let server = RedisServer::start_with(&["--requirepass", "right-password"]);
    let url = format!("redis://:wrong-password@127.0.0.1:{}", server.port());
    let cache = fault_cache(&url);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        for id in 0..20 {
            assert_eq!(value_of(&cache, id).await, Product::expected(id));
        }
        let err = cache.invalidate("values").await.unwrap_err().to_string();
        println!("{:<28} invalidate says: {err}", "wrong password");
        assert!(err.contains("refused the credentials"), "{err}");
        assert!(!err.contains("wrong-password"), "the password must not leak: {err}");
        assert_eq!(cache.stats().total.hits, 0);
    });
}

#[test]
fn a_read_only_replica_serves_hits_and_never_fails_a_call() {
    let _serial = serial();
    let primary = RedisServer::start();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port().to_string()]);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let writer = fault_cache(&primary.url());
        for id in 0..10 {
            value_of(&writer, id).await;
        }
        // Wait until the replica has the entries.
        let mut replica_admin = replica.conn();
        let deadline = Instant::now() + Duration::from_secs(10);
        while support::entry_keys(&mut replica_admin, "faults:values:*").len() < 10 {
            assert!(Instant::now() < deadline, "the replica never synced");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let reader = fault_cache(&replica.url());
        for id in 0..20 {
            assert_eq!(value_of(&reader, id).await, Product::expected(id));
        }
        let stats = reader.stats().total;
        println!("{:<28} {stats:?}", "read-only replica");
        assert_eq!(stats.hits, 10, "replicated entries are hits");
        assert_eq!(stats.misses, 10, "the rest compute");
        assert!(stats.server_errors > 0, "READONLY refusals were absorbed: {stats:?}");
        assert_eq!(stats.writes, 0);
    });
}
