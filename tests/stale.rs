//! Never a stale answer: once a write path's `invalidate`, `forget` or
//! `refresh` has returned, no caller gets a value computed from data older
//! than that write. Each test here is a scenario that broke the promise
//! once; `tests/history.rs` looks for the ones nobody named.

mod support;

use cache_runtime::{Cache, cached};
use serde::{Deserialize, Deserializer, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};
use support::{Db, RedisServer, run};

const DEADLINE: Duration = Duration::from_secs(60);

/// Waits until `db` has been read `reads` times: the computation under
/// test has read its source.
async fn until_read(db: &Db, reads: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while db.reads() < reads {
        assert!(Instant::now() < deadline, "the computation never read its source");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

// --- coalesced callers after a write ----------------------------------------

#[cached(ttl = 600, prefix = "rows", skip(db), cache = cache)]
async fn slow_row(cache: &Cache, db: &Db, id: u64) -> String {
    let version = db.read();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Long enough to be over max_value_bytes where a test sets it low.
    format!("row {id} at version {version}{}", " ".repeat(64))
}

/// A computes from version 1; the source changes and `invalidate` returns;
/// B then asks and joins A's flight. B must not get A's value.
async fn waiter_after_invalidate(cache: Cache, writer: Cache) {
    let db = Arc::new(Db::new(1));
    let first = {
        let (cache, db) = (cache.clone(), db.clone());
        tokio::spawn(async move { slow_row(&cache, &db, 7).await })
    };
    until_read(&db, 1).await;
    db.set(2);
    writer.invalidate("rows").await.expect("invalidate reaches the cache");
    let second = slow_row(&cache, &db, 7).await;
    assert!(second.contains("version 2"), "a call that began after the invalidate got {second:?}");
    assert!(first.await.expect("first call").contains("version 1"), "the first call began before the write");
}

#[test]
fn memory_only_waiter_after_invalidate_gets_the_new_value() {
    run(DEADLINE, async {
        let cache = Cache::builder().build().expect("memory-only cache");
        waiter_after_invalidate(cache.clone(), cache).await;
    });
}

#[test]
fn unstored_value_is_not_shared_after_an_invalidate_in_this_process() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = support::patient_cache(&server.url(), "stale").max_value_bytes(16).build().expect("cache");
        waiter_after_invalidate(cache.clone(), cache).await;
    });
}

#[test]
fn unstored_value_is_not_shared_after_an_invalidate_elsewhere() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        // Two caches on one Redis stand for two processes: the writer's
        // invalidation reaches the reader only through Redis.
        let cache = support::patient_cache(&server.url(), "stale").max_value_bytes(16).build().expect("cache");
        let writer = support::patient_cache(&server.url(), "stale").build().expect("cache");
        waiter_after_invalidate(cache, writer).await;
    });
}

// --- forget while a computation is under way --------------------------------

#[test]
fn a_computation_that_read_before_a_forget_does_not_store() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = support::patient_cache(&server.url(), "stale").build().expect("cache");
        let db = Arc::new(Db::new(1));
        let first = {
            let (cache, db) = (cache.clone(), db.clone());
            tokio::spawn(async move { slow_row(&cache, &db, 8).await })
        };
        until_read(&db, 1).await;
        db.set(2);
        let forgot = cache_runtime::forget(slow_row(&cache, &db, 8)).await.expect("forget reaches Redis");
        assert!(!forgot, "nothing was stored yet");
        first.await.expect("first call");
        let after = slow_row(&cache, &db, 8).await;
        assert!(after.contains("version 2"), "the computation that began before the forget stored {after:?}");
    });
}

// --- refresh-ahead and write-through -----------------------------------------

static HOT_DB: AtomicU32 = AtomicU32::new(1);
static HOT_SLOW: AtomicBool = AtomicBool::new(false);
static HOT_RENEWALS_STARTED: AtomicUsize = AtomicUsize::new(0);

#[cached(ttl = 2, prefix = "hot", refresh_ahead = 0.5, cache = cache)]
async fn hot_price(cache: Cache, id: u64) -> u32 {
    let _ = (&cache, id);
    let version = HOT_DB.load(SeqCst);
    if HOT_SLOW.load(SeqCst) {
        HOT_RENEWALS_STARTED.fetch_add(1, SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    version
}

#[test]
fn refresh_ahead_does_not_undo_a_write_through() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = support::patient_cache(&server.url(), "stale").build().expect("cache");
        assert_eq!(hot_price(cache.clone(), 1).await, 1);
        // Past half the TTL, a hit starts a renewal, which reads version 1
        // and takes its time.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        HOT_SLOW.store(true, SeqCst);
        assert_eq!(hot_price(cache.clone(), 1).await, 1, "a hit, renewing in the background");
        let deadline = Instant::now() + Duration::from_secs(5);
        while HOT_RENEWALS_STARTED.load(SeqCst) == 0 {
            assert!(Instant::now() < deadline, "no renewal started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        HOT_SLOW.store(false, SeqCst);
        HOT_DB.store(2, SeqCst);
        assert_eq!(cache_runtime::refresh(hot_price(cache.clone(), 1)).await, 2);
        // The renewal finishes meanwhile; every later call sees version 2.
        let until = Instant::now() + Duration::from_millis(800);
        while Instant::now() < until {
            assert_eq!(hot_price(cache.clone(), 1).await, 2, "the renewal put back what it read before the write");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

// --- forget and the local tier ----------------------------------------------

static LISTED: AtomicU32 = AtomicU32::new(1);

#[cached(ttl = 600, prefix = "listed", local = true, cache = cache)]
async fn listed(cache: &Cache, id: u64) -> Result<u32, String> {
    let _ = (cache, id);
    match LISTED.load(SeqCst) {
        0 => Err("no such row".to_owned()),
        version => Ok(version),
    }
}

#[test]
fn forget_is_not_undone_by_a_concurrent_local_fill() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = support::patient_cache(&server.url(), "stale").local(1_000).build().expect("cache");
        let stop = Arc::new(AtomicBool::new(false));
        let mut stale = 0;
        for round in 1..=40u32 {
            LISTED.store(round, SeqCst);
            assert_eq!(cache_runtime::refresh(listed(&cache, 1)).await, Ok(round));
            // Readers refill the local tier from Redis all along.
            stop.store(false, SeqCst);
            let readers: Vec<_> = (0..4)
                .map(|_| {
                    let (cache, stop) = (cache.clone(), stop.clone());
                    tokio::spawn(async move {
                        while !stop.load(SeqCst) {
                            let _ = listed(&cache, 1).await;
                            tokio::task::yield_now().await;
                        }
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(5)).await;
            // The row is deleted: the function now fails, so nothing is
            // stored over a stale copy.
            LISTED.store(0, SeqCst);
            cache_runtime::forget(listed(&cache, 1)).await.expect("forget reaches Redis");
            for _ in 0..3 {
                if listed(&cache, 1).await.is_ok() {
                    stale += 1;
                }
            }
            stop.store(true, SeqCst);
            for reader in readers {
                reader.await.expect("reader");
            }
        }
        assert_eq!(stale, 0, "calls after forget returned got the deleted row {stale} times");
    });
}

// --- the local tier after its runtime is gone -------------------------------

#[cached(ttl = 600, prefix = "catalog", local = true, skip(db), cache = cache)]
async fn catalog(cache: &Cache, db: &Db, id: u64) -> u32 {
    let _ = id;
    db.read()
}

#[test]
fn the_local_tier_listens_again_after_its_runtime_is_dropped() {
    let server = RedisServer::start();
    let cache = support::patient_cache(&server.url(), "stale").local(1_000).build().expect("cache");
    let db = Db::new(1);
    // A short-lived runtime makes the first local call: the listener starts
    // there, and dies with it.
    let first = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    first.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(5);
        while cache.stats().total.local_hits == 0 {
            assert!(Instant::now() < deadline, "the local tier never answered");
            assert_eq!(catalog(&cache, &db, 1).await, 1);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    drop(first);
    run(DEADLINE, async {
        assert_eq!(catalog(&cache, &db, 1).await, 1);
        db.set(2);
        // Another process (another cache on the same Redis) invalidates.
        let other = support::patient_cache(&server.url(), "stale").build().expect("cache");
        other.invalidate("catalog").await.expect("invalidate");
        let deadline = Instant::now() + Duration::from_secs(3);
        while catalog(&cache, &db, 1).await != 2 {
            assert!(Instant::now() < deadline, "the local tier kept serving an invalidated entry");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
}

// --- deleting an undecodable entry ------------------------------------------

/// Fails to decode once, slowly, when told to: a layout another deploy
/// cannot read, while that deploy stores a good entry meanwhile.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Layout(u32);

static FAIL_NEXT_DECODE: AtomicBool = AtomicBool::new(false);

impl<'de> Deserialize<'de> for Layout {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = u32::deserialize(deserializer)?;
        if FAIL_NEXT_DECODE.swap(false, SeqCst) {
            std::thread::sleep(Duration::from_millis(400));
            return Err(serde::de::Error::custom("written for another layout"));
        }
        Ok(Layout(value))
    }
}

static LAYOUT_DB: AtomicU32 = AtomicU32::new(1);

#[cached(ttl = 600, prefix = "layout", cache = cache)]
async fn layout(cache: &Cache, id: u64) -> Layout {
    let _ = (cache, id);
    Layout(LAYOUT_DB.load(SeqCst))
}

#[test]
fn an_undecodable_entry_is_deleted_only_if_still_the_one_read() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = support::patient_cache(&server.url(), "stale").build().expect("cache");
        assert_eq!(layout(&cache, 1).await, Layout(1));
        FAIL_NEXT_DECODE.store(true, SeqCst);
        // The reader on a thread and runtime of its own: its decode blocks
        // that thread for 400 ms, and on one of this runtime's two workers
        // it could hold up the timers and I/O this test waits on, so that
        // the reader computed before the write below began.
        let reader = {
            let cache = cache.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                runtime.block_on(layout(&cache, 1))
            })
        };
        // While the reader decodes, the other deploy writes a good entry.
        // Waiting for the reader's decode to begin, not for a fixed time: on
        // a loaded machine the refresh's own checks could otherwise take the
        // one failing decode, and the reader read before the refresh.
        let deadline = Instant::now() + Duration::from_secs(10);
        while FAIL_NEXT_DECODE.load(SeqCst) {
            assert!(Instant::now() < deadline, "the reader never decoded");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        LAYOUT_DB.store(2, SeqCst);
        assert_eq!(cache_runtime::refresh(layout(&cache, 1)).await, Layout(2));
        let computations = cache.stats().total.computations;
        assert_eq!(tokio::task::spawn_blocking(|| reader.join()).await.expect("join").expect("reader"), Layout(2));
        assert_eq!(
            cache.stats().total.computations,
            computations,
            "the good entry stored after the read was deleted, and computed again"
        );
    });
}

// --- the stated bound: a silently dead channel ------------------------------

#[test]
fn a_silent_channel_stops_local_answers_within_the_stated_bound() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = support::patient_cache(&server.url(), "stale")
            .command_timeout(Duration::from_millis(200))
            .connect_timeout(Duration::from_millis(200))
            .local(1_000)
            .build()
            .expect("cache");
        let db = Db::new(1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while cache.stats().total.local_hits == 0 {
            assert!(Instant::now() < deadline, "the local tier never answered");
            catalog(&cache, &db, 9).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The server stops answering without closing anything: a message
        // published now could be lost without a trace. Only the channel's
        // ping can tell.
        server.freeze();
        let frozen = Instant::now();
        let mut last_local = frozen;
        while frozen.elapsed() < Duration::from_secs(4) {
            let before = cache.stats().total.local_hits;
            catalog(&cache, &db, 9).await;
            if cache.stats().total.local_hits > before {
                last_local = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server.resume();
        let trusted_for = last_local - frozen;
        println!("local answers went on for {trusted_for:?} after the channel went silent");
        // The bound docs/CONSISTENCY.md states: the ping interval (1 s) plus
        // the connect and command timeouts; the margin is for a loaded machine.
        assert!(trusted_for <= Duration::from_millis(1_400 + 800), "local answers for {trusted_for:?}");
    });
}

// --- two write-throughs at once ---------------------------------------------

static DUO_DB: AtomicU32 = AtomicU32::new(1);
static DUO_SLOW_NEXT: AtomicBool = AtomicBool::new(false);

#[cached(ttl = 600, prefix = "duo", cache = cache)]
async fn duo(cache: &Cache, id: u64) -> u32 {
    let _ = (cache, id);
    let version = DUO_DB.load(SeqCst);
    if DUO_SLOW_NEXT.swap(false, SeqCst) {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    version
}

/// An older write's slow refresh finishes after a newer write's refresh
/// returned: the older value must not stay.
async fn older_refresh_finishing_last(cache: Cache, id: u64) {
    DUO_DB.store(1, SeqCst);
    assert_eq!(duo(&cache, id).await, 1);
    DUO_DB.store(30, SeqCst);
    DUO_SLOW_NEXT.store(true, SeqCst);
    let slow = {
        let cache = cache.clone();
        tokio::spawn(async move { cache_runtime::refresh(duo(&cache, id)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    DUO_DB.store(31, SeqCst);
    assert_eq!(cache_runtime::refresh(duo(&cache, id)).await, 31);
    assert_eq!(slow.await.expect("slow refresh"), 30, "it read before the newer write");
    assert_eq!(duo(&cache, id).await, 31, "the older write-through's value stayed");
}

#[test]
fn an_older_refresh_finishing_last_does_not_win() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = support::patient_cache(&server.url(), "stale").build().expect("cache");
        older_refresh_finishing_last(cache, 1).await;
        let memory = Cache::builder().build().expect("memory-only cache");
        older_refresh_finishing_last(memory, 2).await;
    });
}

// --- an entry one process cannot decode ---------------------------------------

/// A computes from old data holding the lock, having seen the key empty; a
/// write-through then stores a value too large for B (whose
/// `max_value_bytes` is smaller), and B reads it. B must not leave the key
/// empty: A's store, which expects it empty, would then put the old value
/// back over the write.
#[test]
fn an_entry_another_process_cannot_decode_is_not_emptied_under_a_computation() {
    use cache_runtime::{Compression, Policy};
    run(DEADLINE, async {
        let server = RedisServer::start();
        let big = support::patient_cache(&server.url(), "undecodable").build().expect("cache");
        let writer = support::patient_cache(&server.url(), "undecodable").build().expect("cache");
        let small = support::patient_cache(&server.url(), "undecodable").max_value_bytes(1024).build().expect("cache");
        let policy = Policy::new("wide").ttl(Duration::from_secs(600)).compress(Compression::None);
        let (started, release) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
        let old = {
            let (big, policy, started, release) = (big.clone(), policy.clone(), started.clone(), release.clone());
            tokio::spawn(async move {
                big.get_or_compute(&policy, &1u64, async move {
                    started.notify_one();
                    release.notified().await;
                    Ok::<_, String>("old".to_owned())
                })
                .await
            })
        };
        started.notified().await;
        let new = "new".repeat(2000);
        let refreshed = writer.refresh(&policy, &1u64, async { Ok::<_, String>(new.clone()) }).await;
        assert_eq!(refreshed.as_deref(), Ok(new.as_str()));
        // B cannot decode it; its own computation fails, so B stores nothing.
        let unlocked = policy.clone().lock(false);
        let failed = small.get_or_compute(&unlocked, &1u64, async { Err::<String, _>("source down".to_owned()) }).await;
        assert!(failed.is_err());
        release.notify_one();
        assert_eq!(old.await.expect("A's call").as_deref(), Ok("old"), "A answers its own caller");
        let after = writer.get_or_compute(&policy, &1u64, async { Ok::<_, String>("recomputed".to_owned()) }).await;
        assert_ne!(after.as_deref(), Ok("old"), "a value computed before the write-through came back");
    });
}

// --- a write path cancelled once Redis has it ---------------------------------

#[cached(ttl = 600, prefix = "shelf", local = true, skip(db), cache = cache)]
async fn shelf_row(cache: &Cache, db: &Db, id: u64) -> String {
    format!("row {id} at version {}", db.read())
}

/// An `invalidate` (or `clear`) cancelled after Redis received it still
/// takes effect everywhere, this process's local tier included: this
/// process ignores its own invalidation messages, so nothing else would
/// drop its local copies.
async fn cancelled_write_reaches_the_local_tier(clear: bool) {
    let server = RedisServer::start();
    let cache = support::patient_cache(&server.url(), "cancelled").local(1_000).build().expect("cache");
    let db = Db::new(1);
    // The local tier serves once this process listens for invalidations.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache.stats().total.local_hits == 0 {
        assert!(shelf_row(&cache, &db, 1).await.contains("version 1"));
        assert!(Instant::now() < deadline, "the local tier never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let version_key = if clear { "cancelled:#all:{#all}#v" } else { "cancelled:shelf:{shelf}#v" };
    let before: Option<String> = redis::cmd("GET").arg(version_key).query(&mut server.conn()).expect("GET");
    assert!(before.is_some(), "{version_key} is where the version lives");
    // Loads the invalidation script: a first `EVALSHA` would come back
    // `NOSCRIPT` after the pause, with no one left to load it.
    cache.invalidate("elsewhere").await.expect("invalidate");
    db.set(2);
    // Redis holds write commands for a while: the write is sent, and its
    // caller gives up before the answer.
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(1_000).arg("WRITE").query(&mut server.conn()).expect("PAUSE");
    let write = async { if clear { cache.clear().await } else { cache.invalidate("shelf").await.map(drop) } };
    assert!(
        tokio::time::timeout(Duration::from_millis(200), write).await.is_err(),
        "the paused server answers nothing"
    );
    // The cancelled command runs once the pause ends.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now: Option<String> = redis::cmd("GET").arg(version_key).query(&mut server.conn()).expect("GET");
        if now != before {
            break;
        }
        assert!(Instant::now() < deadline, "the cancelled write never reached Redis");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = shelf_row(&cache, &db, 1).await;
    assert!(after.contains("version 2"), "a write that reached Redis left this process serving {after:?}");
}

#[test]
fn a_cancelled_invalidate_that_reached_redis_reaches_the_local_tier() {
    run(DEADLINE, cancelled_write_reaches_the_local_tier(false));
}

#[test]
fn a_cancelled_clear_that_reached_redis_reaches_the_local_tier() {
    run(DEADLINE, cancelled_write_reaches_the_local_tier(true));
}
