//! The in-process tier, refresh-ahead and serve-stale-on-error, against
//! real Redis servers and a second OS process; and the memory-only cache,
//! which needs no Redis at all.

mod support;

use cache_runtime::{Cache, cached};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};
use support::{Db, RedisServer, Topology, run};

const DEADLINE: Duration = Duration::from_secs(60);
/// How soon another process's invalidation must reach the local tier. It
/// takes one pub/sub hop (well under a millisecond on loopback); the margin
/// is for loaded CI machines.
const PROMPTLY: Duration = Duration::from_secs(1);

fn tiered_cache(url: &str) -> Cache {
    support::patient_cache(url, "tiers").local(1_000).build().expect("valid cache settings")
}

#[cached(ttl = 600, prefix = "catalog", local = true, skip(db), cache = cache)]
async fn catalog_page(cache: &Cache, db: &Db, id: u64) -> String {
    format!("item {id} costs {}", db.read())
}

fn local_hits(cache: &Cache) -> u64 {
    cache.stats().total.local_hits
}

/// Calls `call` until one call is answered from the local tier: the tier
/// is trusted once its invalidation channel is subscribed.
async fn until_local_hit<F: Future>(cache: &Cache, call: impl Fn() -> F) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = local_hits(cache);
        call().await;
        if local_hits(cache) > before {
            return;
        }
        assert!(Instant::now() < deadline, "the local tier never answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// --- the other process ------------------------------------------------------

/// When re-executed with CACHE_TEST_ROLE set, this test binary acts as the
/// other process.
#[test]
fn helper_process() {
    let (Ok(role), Ok(url)) = (std::env::var("CACHE_TEST_ROLE"), std::env::var("CACHE_TEST_URL")) else { return };
    let subject = std::env::var("CACHE_TEST_SUBJECT").unwrap_or_default();
    run(DEADLINE, async {
        let cache = tiered_cache(&url);
        match role.as_str() {
            "invalidate" => {
                cache.invalidate(&subject).await.expect("invalidate from the other process");
            }
            "forget" => {
                let id: u64 = subject.parse().expect("an id");
                let existed = cache_runtime::forget(catalog_page(&cache, &Db::new(0), id)).await;
                assert_eq!(existed, Ok(true));
            }
            "hammer" => {
                let millis: u64 = subject.parse().expect("a duration");
                let until = Instant::now() + Duration::from_millis(millis);
                while Instant::now() < until {
                    assert_eq!(hot(cache.clone(), 7).await, 14);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let counts = cache.stats().total;
                println!("misses={} computations={}", counts.misses, counts.computations);
            }
            other => panic!("unknown role {other}"),
        }
        println!("done {role} {subject}");
    });
}

/// Runs `role` in another OS process and waits for it to finish.
async fn in_other_process(url: &str, role: &str, subject: &str) -> String {
    let (url, role, subject) = (url.to_owned(), role.to_owned(), subject.to_owned());
    tokio::task::spawn_blocking(move || {
        let output = Command::new(std::env::current_exe().expect("test binary path"))
            .args(["--exact", "helper_process", "--nocapture", "--test-threads=1"])
            .env("CACHE_TEST_ROLE", &role)
            .env("CACHE_TEST_URL", &url)
            .env("CACHE_TEST_SUBJECT", &subject)
            .output()
            .expect("spawn the helper process");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "helper failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
        assert!(stdout.contains(&format!("done {role} {subject}")), "{stdout}");
        stdout
    })
    .await
    .expect("the helper thread")
}

/// Calls until the page shows `price`; fails if that takes longer than
/// [`PROMPTLY`]. Returns how long it took.
async fn until_price(cache: &Cache, db: &Db, price: u32) -> Duration {
    let since = Instant::now();
    let expected = format!("item 1 costs {price}");
    while catalog_page(cache, db, 1).await != expected {
        assert!(since.elapsed() < PROMPTLY, "the local tier still serves the old page after {:?}", since.elapsed());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    since.elapsed()
}

// --- local tier ---------------------------------------------------------------

fn the_local_tier_drops_what_another_process_invalidates_or_forgets(server: &Topology) {
    let url = server.url();
    run(DEADLINE, async {
        let cache = tiered_cache(&url);
        let db = Db::new(10);
        until_local_hit(&cache, || catalog_page(&cache, &db, 1)).await;
        let (reads, hits) = (db.reads(), local_hits(&cache));
        for _ in 0..100 {
            assert_eq!(catalog_page(&cache, &db, 1).await, "item 1 costs 10");
        }
        assert_eq!(db.reads(), reads, "no computation");
        assert_eq!(local_hits(&cache), hits + 100, "every call answered from memory");

        db.set(20);
        in_other_process(&url, "invalidate", "catalog").await;
        let took = until_price(&cache, &db, 20).await;
        println!("another process's invalidate reached the local tier in {took:?}");

        db.set(30);
        until_local_hit(&cache, || catalog_page(&cache, &db, 1)).await;
        in_other_process(&url, "forget", "1").await;
        let took = until_price(&cache, &db, 30).await;
        println!("another process's forget reached the local tier in {took:?}");

        // This process's own invalidation applies before `invalidate` returns.
        until_local_hit(&cache, || catalog_page(&cache, &db, 1)).await;
        db.set(40);
        cache.invalidate("catalog").await.expect("invalidate");
        assert_eq!(catalog_page(&cache, &db, 1).await, "item 1 costs 40");
    });
}

#[test]
fn while_the_channel_is_down_the_local_tier_is_not_used() {
    let server = RedisServer::start();
    let url = server.url();
    let mut admin = server.conn();
    run(DEADLINE, async {
        let cache = tiered_cache(&url);
        let db = Db::new(10);
        until_local_hit(&cache, || catalog_page(&cache, &db, 1)).await;

        // Cut the channel and keep it from coming back: the default user may
        // no longer subscribe.
        let _: () = redis::cmd("ACL").arg(&["SETUSER", "default", "resetchannels"]).query(&mut admin).expect("ACL");
        let _: u64 = redis::cmd("CLIENT").arg(&["KILL", "TYPE", "pubsub"]).query(&mut admin).expect("CLIENT KILL");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let before = local_hits(&cache);
            catalog_page(&cache, &db, 1).await;
            if local_hits(&cache) == before {
                break;
            }
            assert!(Instant::now() < deadline, "the tier kept answering without its channel");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // An invalidation whose announcement nobody here receives.
        db.set(20);
        in_other_process(&url, "invalidate", "catalog").await;
        assert_eq!(catalog_page(&cache, &db, 1).await, "item 1 costs 20", "read from Redis at once");
        let before = local_hits(&cache);
        for _ in 0..20 {
            assert_eq!(catalog_page(&cache, &db, 1).await, "item 1 costs 20");
        }
        assert_eq!(local_hits(&cache), before, "no local answers while the channel is down");
        assert!(cache.stats().total.hits > 20, "answered from Redis instead");

        let _: () = redis::cmd("ACL").arg(&["SETUSER", "default", "allchannels"]).query(&mut admin).expect("ACL");
        until_local_hit(&cache, || catalog_page(&cache, &db, 1)).await;
        assert_eq!(catalog_page(&cache, &db, 1).await, "item 1 costs 20");
    });
}

// --- refresh-ahead ------------------------------------------------------------

#[cached(ttl = 1, prefix = "hot", refresh_ahead = 0.5, cache = cache)]
async fn hot(cache: Cache, id: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(50)).await;
    id * 2
}

fn refresh_ahead_keeps_a_hot_key_hot_across_processes(server: &Topology) {
    let url = server.url();
    run(DEADLINE, async {
        let cache = tiered_cache(&url);
        assert_eq!(hot(cache.clone(), 7).await, 14);
        const LOAD: Duration = Duration::from_millis(3_500);
        let other = tokio::spawn({
            let url = url.clone();
            async move { in_other_process(&url, "hammer", &LOAD.as_millis().to_string()).await }
        });
        let until = Instant::now() + LOAD;
        let mut calls = 1;
        while Instant::now() < until {
            assert_eq!(hot(cache.clone(), 7).await, 14);
            calls += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let stdout = other.await.expect("the other process");
        let counts = cache.stats().total;
        let field = |name: &str| -> usize {
            let text = stdout.split(&format!("{name}=")).nth(1).expect("the helper's counts");
            text.split_whitespace().next().and_then(|n| n.parse().ok()).expect("a number")
        };
        let (their_misses, their_computations) = (field("misses"), field("computations"));
        // This cache's own count: the same test runs at once on other
        // topologies in this process.
        let ours = counts.computations as usize;
        println!(
            "{calls} calls here over {LOAD:?} with a 1 s TTL: {} miss, {} renewals here, \
             {their_computations} there; computations in all: {}",
            counts.misses,
            counts.renewals,
            ours + their_computations
        );
        assert_eq!(counts.misses, 1, "only the very first call here missed");
        assert_eq!(their_misses, 0, "no caller in the other process saw a miss");
        assert!(counts.renewals + their_computations as u64 >= 3, "the entry was renewed through several TTLs");
        // One renewal per half TTL at most, across both processes, plus the
        // first computation and some slack for timing.
        assert!(ours + their_computations <= 10, "renewals were not deduplicated: {}", ours + their_computations);
    });
}

// --- stale-if-error -----------------------------------------------------------

static QUOTES_FAIL: AtomicBool = AtomicBool::new(false);

#[cached(ttl = 1, prefix = "quotes", stale_if_error = 60, cache = cache)]
async fn quote(cache: &Cache, symbol: String) -> Result<u64, String> {
    if QUOTES_FAIL.load(SeqCst) { Err(format!("the database is down, no quote for {symbol}")) } else { Ok(42) }
}

fn stale_if_error_serves_the_kept_copy_until_the_namespace_is_invalidated(server: &Topology) {
    let url = server.url();
    run(DEADLINE, async {
        let cache = tiered_cache(&url);
        assert_eq!(quote(&cache, "ACME".into()).await, Ok(42));
        tokio::time::sleep(Duration::from_millis(1_100)).await;

        QUOTES_FAIL.store(true, SeqCst);
        for served in 1..=3 {
            assert_eq!(quote(&cache, "ACME".into()).await, Ok(42), "the stale copy, not the error");
            assert_eq!(cache.stats().total.stale_served, served);
        }
        assert!(quote(&cache, "OTHER".into()).await.is_err(), "nothing kept for a key never computed");

        in_other_process(&url, "invalidate", "quotes").await;
        let after = quote(&cache, "ACME".into()).await;
        assert!(after.is_err(), "an invalidated entry is never served stale: {after:?}");
        assert_eq!(cache.stats().total.stale_served, 3);

        QUOTES_FAIL.store(false, SeqCst);
        assert_eq!(quote(&cache, "ACME".into()).await, Ok(42));
    });
}

// --- memory-only --------------------------------------------------------------

static MEMORY_COMPUTATIONS: AtomicUsize = AtomicUsize::new(0);
static MEMORY_FAIL: AtomicBool = AtomicBool::new(false);

#[cached(ttl = 1, prefix = "memory", stale_if_error = 60, cache = cache)]
async fn remembered(cache: &Cache, id: u64) -> Result<u64, String> {
    MEMORY_COMPUTATIONS.fetch_add(1, SeqCst);
    tokio::time::sleep(Duration::from_millis(20)).await;
    if MEMORY_FAIL.load(SeqCst) { Err("down".to_owned()) } else { Ok(id + 1) }
}

static FRESH_COMPUTATIONS: AtomicUsize = AtomicUsize::new(0);

#[cached(ttl = 1, prefix = "fresh", refresh_ahead = 0.5, cache = cache)]
async fn always_fresh(cache: Cache, id: u64) -> u64 {
    FRESH_COMPUTATIONS.fetch_add(1, SeqCst);
    id
}

#[test]
fn a_memory_only_cache_needs_no_redis() {
    let cache = Cache::builder().build().expect("no URL: memory-only");
    assert!(cache.is_memory_only());
    let computed = || MEMORY_COMPUTATIONS.load(SeqCst);
    run(DEADLINE, async {
        assert_eq!(remembered(&cache, 1).await, Ok(2));
        assert_eq!(remembered(&cache, 1).await, Ok(2));
        assert_eq!((computed(), cache.stats().total.local_hits), (1, 1));

        cache.invalidate("memory").await.expect("invalidate in memory");
        assert_eq!(remembered(&cache, 1).await, Ok(2));
        assert_eq!(computed(), 2, "invalidated");
        assert_eq!(cache_runtime::forget(remembered(&cache, 1)).await, Ok(true));
        assert_eq!(remembered(&cache, 1).await, Ok(2));
        assert_eq!(computed(), 3, "forgotten");

        let callers: Vec<_> = (0..100)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { remembered(&cache, 9).await })
            })
            .collect();
        for caller in callers {
            assert_eq!(caller.await.expect("caller"), Ok(10));
        }
        assert_eq!(computed(), 4, "100 concurrent callers, one computation");

        tokio::time::sleep(Duration::from_millis(1_100)).await;
        MEMORY_FAIL.store(true, SeqCst);
        assert_eq!(remembered(&cache, 9).await, Ok(10), "stale copy while failing");
        assert_eq!(cache.stats().total.stale_served, 1);
        cache.invalidate("memory").await.expect("invalidate in memory");
        assert_eq!(remembered(&cache, 9).await, Err("down".to_owned()), "never stale after an invalidate");

        let until = Instant::now() + Duration::from_millis(2_500);
        while Instant::now() < until {
            assert_eq!(always_fresh(cache.clone(), 3).await, 3);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let fresh = cache.stats().prefix("fresh").copied().expect("counted");
        assert_eq!(fresh.misses, 1, "renewed ahead of every expiry");
        assert!(fresh.renewals >= 2, "{fresh:?}");
        assert!(FRESH_COMPUTATIONS.load(SeqCst) <= 8, "{}", FRESH_COMPUTATIONS.load(SeqCst));
    });
}

#[cached(ttl = 600, prefix = "tiny", cache = cache)]
async fn tiny(cache: &Cache, id: u64) -> u64 {
    id
}

#[test]
fn a_small_memory_only_cache_evicts_and_counts() {
    let cache = Cache::builder().local(8).build().expect("memory-only");
    run(DEADLINE, async {
        for id in 0..200 {
            assert_eq!(tiny(&cache, id).await, id);
        }
        // moka applies evictions in batches; `stats` reports those applied.
        let deadline = Instant::now() + Duration::from_secs(5);
        while cache.stats().total.local_evictions == 0 {
            assert_eq!(tiny(&cache, 0).await, 0);
            assert!(Instant::now() < deadline, "no eviction was counted");
        }
        println!("{} evictions", cache.stats().total.local_evictions);
    });
}

on_every_topology!(
    the_local_tier_drops_what_another_process_invalidates_or_forgets,
    refresh_ahead_keeps_a_hot_key_hot_across_processes,
    stale_if_error_serves_the_kept_copy_until_the_namespace_is_invalidated,
);
