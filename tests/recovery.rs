//! Recovery after cancellation, shutdown and half-open sockets: the cache
//! comes back after every fault, at any pool size and on any runtime.
//!
//! Each test breaks something that used to leave the cache off or hung for
//! good, then measures how long until calls hit again, and prints it
//! (`cargo test --test recovery -- --nocapture --test-threads 1`).

mod support;

use cache_runtime::{Cache, InFlight, cached};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};
use support::{Db, RedisServer};

/// The tests measure recovery times: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cached(ttl = 600, prefix = "values", cache = cache)]
async fn value(cache: &Cache, id: u32) -> u32 {
    tokio::time::sleep(Duration::from_millis(1)).await;
    id * 10
}

/// The process-wide cache's own function: no `cache =`.
#[cached(ttl = 600, prefix = "global")]
async fn global_value(id: u32) -> u32 {
    id * 10
}

#[cached(ttl = 600, prefix = "tiered", local = true, skip(db), cache = cache)]
async fn tiered(cache: &Cache, db: &Db, id: u32) -> u32 {
    db.read() + id
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

/// Calls `value(id)` until one is a hit; returns how long that took, or
/// `None` if none was within `within`. The entry may be gone (a restarted
/// server is empty): a miss stores it again.
async fn until_hit(cache: &Cache, id: u32, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        let hits = cache.stats().total.hits;
        assert_eq!(value(cache, id).await, id * 10);
        if cache.stats().total.hits > hits {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Waits until nothing is under way, and returns what was when it gave up.
async fn settled(cache: &Cache, within: Duration) -> InFlight {
    let started = Instant::now();
    loop {
        let in_flight = cache.stats().in_flight;
        if in_flight == InFlight::default() || started.elapsed() > within {
            return in_flight;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Callers looping over `keys` on `runtime` until `stop`.
fn load(runtime: &tokio::runtime::Runtime, cache: &Cache, callers: u32, keys: u32, stop: &Arc<AtomicBool>) {
    for caller in 0..callers {
        let (cache, stop) = (cache.clone(), stop.clone());
        runtime.spawn(async move {
            let mut id = caller;
            while !stop.load(SeqCst) {
                id = (id * 21 + 13) % keys;
                assert_eq!(value(&cache, id).await, id * 10);
            }
        });
    }
}

/// Restarts the server under load and measures how long until hits are
/// back once it answers again.
fn restart_recovery(name: &str, builder: cache_runtime::CacheBuilder) {
    let _serial = serial();
    let mut server = RedisServer::start();
    let cache = builder
        .url(server.url())
        .key_prefix("recovery")
        .command_timeout(Duration::from_millis(100))
        .connect_timeout(Duration::from_millis(100))
        .circuit_breaker(5, Duration::from_millis(200))
        .build()
        .expect("valid cache settings");
    let runtime = runtime();
    runtime.block_on(async {
        assert!(until_hit(&cache, 1, Duration::from_secs(2)).await.is_some(), "no hit before the fault");
    });
    let stop = Arc::new(AtomicBool::new(false));
    load(&runtime, &cache, 8, 50, &stop);
    std::thread::sleep(Duration::from_millis(300));
    server.restart();
    let back = Instant::now();
    let recovered = runtime.block_on(until_hit(&cache, 1, Duration::from_secs(5)));
    stop.store(true, SeqCst);
    let stats = cache.stats();
    println!("{name:<40} first hit {recovered:.1?} after the restarted server answered");
    let recovered = recovered.unwrap_or_else(|| panic!("{name}: no hit within 5 s of the restart; {stats:?}"));
    assert!(recovered < Duration::from_secs(1), "{name}: hits came back after {recovered:?}; {stats:?}");
    assert!(stats.total.connection_errors + stats.total.timeouts > 0, "{name}: the restart went unseen: {stats:?}");
    let _ = back;
}

/// `pool_size(1)`: the one kept connection holds the pool's one permit.
#[test]
fn a_pool_of_one_recovers_from_a_restart() {
    restart_recovery("pool_size(1), restart", Cache::builder().pool_size(1));
}

/// As many kept connections as the pool allows: the default `pool_size` 8
/// on a machine with 8 cores or more.
#[test]
fn a_pool_of_kept_connections_only_recovers_from_a_restart() {
    restart_recovery("pool_size(4) all kept, restart", Cache::builder().pool_size(4).kept_connections(4));
}

/// A runtime dropped while its calls are batched must not leave the
/// batcher's in-flight slot taken: later calls, in any runtime, would queue
/// behind a flush that no longer exists.
#[test]
fn a_runtime_dropped_with_calls_in_flight_leaves_later_calls_unharmed() {
    let _serial = serial();
    let server = RedisServer::start();
    let cache = Cache::builder()
        .url(server.url())
        .key_prefix("shutdown")
        .command_timeout(Duration::from_millis(200))
        .connect_timeout(Duration::from_millis(200))
        .build()
        .expect("valid cache settings");
    let warm = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    warm.block_on(async {
        for id in 0..64 {
            value(&cache, id).await;
        }
    });
    drop(warm);
    for round in 0..5 {
        let doomed = runtime();
        let stop = Arc::new(AtomicBool::new(false));
        load(&doomed, &cache, 64, 64, &stop);
        std::thread::sleep(Duration::from_millis(100));
        // Mid-flight: the callers and the flush task are dropped with it.
        drop(doomed);
        let fresh = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        fresh.block_on(async {
            let started = Instant::now();
            let hits = cache.stats().total.hits;
            let lone = tokio::time::timeout(Duration::from_secs(2), value(&cache, 7)).await;
            let took = started.elapsed();
            let stats = cache.stats();
            assert_eq!(lone, Ok(70), "round {round}: a lone call after the shutdown hung; {stats:?}");
            assert!(stats.total.hits > hits, "round {round}: the lone call did not hit (took {took:?}); {stats:?}");
            assert!(took < Duration::from_millis(100), "round {round}: the lone call took {took:?}");
            println!("{:<40} round {round}: lone call {took:.1?}, a hit", "runtime dropped mid-flight");
            let left = settled(&cache, Duration::from_secs(1)).await;
            assert_eq!(left, InFlight::default(), "round {round}: still under way after the shutdown");
        });
    }
}

/// A probe whose caller gives up must hand the probe on; otherwise the
/// breaker stays open for good.
#[test]
fn a_cancelled_breaker_probe_does_not_wedge_the_breaker() {
    let _serial = serial();
    let server = RedisServer::start();
    let cache = Cache::builder()
        .url(server.url())
        .key_prefix("probe")
        .command_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(300))
        .circuit_breaker(1, Duration::from_millis(200))
        .build()
        .expect("valid cache settings");
    runtime().block_on(async {
        assert!(until_hit(&cache, 1, Duration::from_secs(2)).await.is_some(), "no hit before the fault");
        server.freeze();
        // Times out and opens the breaker.
        assert_eq!(value(&cache, 1).await, 10);
        assert!(cache.stats().total.timeouts > 0, "{:?}", cache.stats());
        tokio::time::sleep(Duration::from_millis(250)).await;
        // The probe: stuck on the frozen server, then given up on.
        assert!(tokio::time::timeout(Duration::from_millis(20), value(&cache, 1)).await.is_err());
        let stuck = cache.stats().in_flight;
        server.resume();
        let recovered = until_hit(&cache, 1, Duration::from_secs(3)).await;
        println!("{:<40} first hit {recovered:.1?} after SIGCONT", "cancelled breaker probe");
        assert!(!stuck.breaker_probe, "the cancelled probe was not given back: {stuck:?}");
        let recovered = recovered.unwrap_or_else(|| panic!("no hit within 3 s of the resume; {:?}", cache.stats()));
        assert!(recovered < Duration::from_secs(1), "hits came back after {recovered:?}");
    });
}

/// A probe taken by a call that is then parked (alive, not polled: a
/// `select!` loser kept for later) must not keep the breaker open for
/// good: once the probe is older than any polled call could take, the next
/// call probes, and reads hit again soon after Redis answers.
#[test]
fn a_parked_probe_does_not_keep_the_breaker_open_for_good() {
    let _serial = serial();
    let redis = RedisServer::start();
    let cache = Cache::builder()
        .url(redis.url())
        .key_prefix("parked-probe")
        .connect_timeout(Duration::from_millis(200))
        .command_timeout(Duration::from_millis(200))
        .circuit_breaker(1, Duration::from_millis(100))
        .build()
        .expect("cache");
    // The call that times out opens the breaker; past its cool-down, the
    // parked call takes the probe.
    parked_call_is_outlived(&redis, cache, Duration::from_millis(150), Duration::from_millis(50));
}

/// A call parked while it refills a kept connection's place (connecting
/// to a frozen server) must not keep the place empty for good: with one
/// kept connection (`pool_size(1)`, one core, a cluster) every later call
/// would wait the whole connect deadline and fail, long after Redis
/// answers again.
#[test]
fn a_parked_refill_does_not_keep_its_place_empty_for_good() {
    let _serial = serial();
    let redis = RedisServer::start();
    let cache = Cache::builder()
        .url(redis.url())
        .key_prefix("parked-refill")
        .pool_size(1)
        .connect_timeout(Duration::from_millis(500))
        .command_timeout(Duration::from_millis(100))
        .circuit_breaker(1000, Duration::from_millis(100))
        .build()
        .expect("cache");
    // The call that times out retires the kept connection; the parked
    // call refills its place, connecting to the frozen server.
    parked_call_is_outlived(&redis, cache, Duration::ZERO, Duration::from_millis(100));
}

/// With `redis` frozen: one call that times out, then after `wait` a bulk
/// call parked (alive, not polled) once it has been pending for `pending`.
/// Redis resumes; well past every deadline, three calls compute once: the
/// parked call holds nothing the others need.
fn parked_call_is_outlived(redis: &RedisServer, cache: Cache, wait: Duration, pending: Duration) {
    use cache_runtime::Policy;
    support::run(Duration::from_secs(30), async {
        let policy = Policy::new("parked").ttl(Duration::from_secs(60));
        let value = |n: u32| async move { Ok::<_, std::io::Error>(n) };
        assert_eq!(cache.get_or_compute(&policy, &"warm", value(1)).await.unwrap(), 1);

        redis.freeze();
        assert_eq!(cache.get_or_compute(&policy, &"times out", value(2)).await.unwrap(), 2);
        tokio::time::sleep(wait).await;
        let mut parked = Box::pin(bulk_call(&cache, &policy));
        let polled = tokio::time::timeout(pending, &mut parked).await;
        assert!(polled.is_err(), "pending on Redis");
        redis.resume();

        // Well past the cool-down and every deadline, many times over.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            computations_of_three_calls(&cache, &policy).await,
            1,
            "Redis is back and answering: the next reads hit"
        );
        drop(parked);
    });
}

/// The ids of the clients connected to `server`, other than the asking one.
fn clients(server: &RedisServer) -> Vec<u64> {
    let mut conn = server.conn();
    let own: u64 = redis::cmd("CLIENT").arg("ID").query(&mut conn).expect("CLIENT ID");
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut conn).expect("CLIENT LIST");
    list.lines()
        .filter_map(|line| line.split(' ').find_map(|field| field.strip_prefix("id="))?.parse().ok())
        .filter(|id| *id != own)
        .collect()
}

/// A connection whose command timed out is not used again: the server
/// froze (as a socket whose peer silently went away looks), and after it
/// resumes, hits come back on new connections while the old ones close.
#[test]
fn a_timed_out_connection_is_retired() {
    let _serial = serial();
    let server = RedisServer::start();
    let cache = Cache::builder()
        .url(server.url())
        .key_prefix("frozen")
        .pool_size(4)
        .kept_connections(2)
        .command_timeout(Duration::from_millis(100))
        .connect_timeout(Duration::from_millis(100))
        .circuit_breaker(5, Duration::from_millis(200))
        .build()
        .expect("valid cache settings");
    runtime().block_on(async {
        for _ in 0..4 {
            assert!(until_hit(&cache, 1, Duration::from_secs(2)).await.is_some(), "no hit before the fault");
        }
        let before = clients(&server);
        assert_eq!(before.len(), 2, "two kept connections: {before:?}");
        server.freeze();
        for _ in 0..4 {
            assert_eq!(value(&cache, 1).await, 10);
        }
        assert!(cache.stats().total.timeouts > 0, "{:?}", cache.stats());
        server.resume();
        let recovered = until_hit(&cache, 1, Duration::from_secs(3)).await;
        println!("{:<40} first hit {recovered:.1?} after SIGCONT", "frozen server, timeouts");
        let recovered = recovered.unwrap_or_else(|| panic!("no hit within 3 s of the resume; {:?}", cache.stats()));
        assert!(recovered < Duration::from_secs(1), "hits came back after {recovered:?}");
        // Hits on every kept slot, then the old connections must be gone.
        for _ in 0..4 {
            assert!(until_hit(&cache, 1, Duration::from_secs(1)).await.is_some());
        }
        let started = Instant::now();
        let mut now = clients(&server);
        while now.iter().any(|id| before.contains(id)) && started.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            now = clients(&server);
        }
        assert!(
            !now.iter().any(|id| before.contains(id)),
            "connections that timed out are still open (before {before:?}, now {now:?})"
        );
    });
}

/// Every connection the cache opens has TCP keepalive on, so an idle
/// socket to a vanished peer is noticed in seconds, not hours.
#[test]
fn connections_have_tcp_keepalive() {
    let server = RedisServer::start();
    let cache = support::patient_cache(&server.url(), "keepalive").build().expect("valid cache settings");
    // Kept alive while ss looks: the connections' tasks run on it.
    let runtime = runtime();
    runtime.block_on(async {
        assert!(until_hit(&cache, 1, Duration::from_secs(2)).await.is_some());
    });
    let port = server.port();
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established", "dport", "=", &format!(":{port}")])
        .output()
        .expect("ss(8) is available");
    let sockets = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = sockets.lines().collect();
    assert!(!lines.is_empty(), "no connection to the server seen by ss");
    for line in lines {
        assert!(line.contains("timer:(keepalive"), "a connection without keepalive: {line}");
    }
}

/// Callers dropped at random points (timeouts of 0 to 50 ms around cached
/// calls, under load) while the server restarts or freezes, and now and
/// then a call parked (polled once, then kept alive unpolled, as a
/// `select!` loser kept for later is): while the parked calls live, hits
/// come back and every key answers; once they are dropped, nothing stays
/// in flight. Prints its seed; `RECOVERY_SEED=<seed>` replays one.
#[test]
fn callers_dropped_at_random_points_leave_nothing_behind() {
    let _serial = serial();
    let seed: u64 =
        std::env::var("RECOVERY_SEED").ok().and_then(|seed| seed.parse().ok()).unwrap_or_else(|| rand::rng().random());
    println!("RECOVERY_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut server = RedisServer::start();
    let cache = Cache::builder()
        .url(server.url())
        .key_prefix("cancel")
        .command_timeout(Duration::from_millis(50))
        .connect_timeout(Duration::from_millis(50))
        .circuit_breaker(5, Duration::from_millis(200))
        .lock_timeout(Duration::from_millis(500))
        .pool_size(2)
        .kept_connections(2)
        .build()
        .expect("valid cache settings");
    let runtime = runtime();
    let (stop, release) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let callers: Vec<_> = (0..32)
        .map(|_| {
            let (cache, stop, release, seed) = (cache.clone(), stop.clone(), release.clone(), rng.random::<u64>());
            runtime.spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut parked = Vec::new();
                // Parked under load most calls are queued; parked as the
                // load stops, some hold the lookups' turns on the wire.
                let mut stopping = false;
                while !std::mem::replace(&mut stopping, stop.load(SeqCst)) {
                    let id = rng.random_range(0..40);
                    if parked.len() < 3 && rng.random_bool(if stopping { 0.25 } else { 0.02 }) {
                        let mut call = Box::pin(value(&cache, id));
                        let pending =
                            std::future::poll_fn(|cx| std::task::Poll::Ready(call.as_mut().poll(cx).is_pending()))
                                .await;
                        if pending {
                            parked.push(call);
                        }
                        continue;
                    }
                    let patience = Duration::from_micros(rng.random_range(0..50_000));
                    if let Ok(got) = tokio::time::timeout(patience, value(&cache, id)).await {
                        assert_eq!(got, id * 10);
                    }
                }
                while !release.load(SeqCst) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                parked.len()
            })
        })
        .collect();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(rng.random_range(100..400)));
        if rng.random_bool(0.5) {
            server.restart();
        } else {
            server.freeze();
            std::thread::sleep(Duration::from_millis(rng.random_range(50..300)));
            server.resume();
        }
    }
    std::thread::sleep(Duration::from_millis(rng.random_range(0..200)));
    stop.store(true, SeqCst);
    runtime.block_on(async {
        // The parked calls are alive: the cache works around them. (A key
        // whose in-process leader is parked waits at most a lock timeout.)
        let recovered = until_hit(&cache, 42, Duration::from_secs(3)).await;
        assert!(recovered.is_some(), "seed {seed}: no hit within 3 s beside the parked calls; {:?}", cache.stats());
        for id in 0..40 {
            let started = Instant::now();
            assert_eq!(value(&cache, id).await, id * 10);
            let took = started.elapsed();
            assert!(took < Duration::from_secs(1), "seed {seed}: key {id} took {took:?} beside the parked calls");
        }
        release.store(true, SeqCst);
        let mut parked = 0;
        for caller in callers {
            parked += tokio::time::timeout(Duration::from_secs(2), caller)
                .await
                .expect("a caller hung")
                .expect("a caller panicked");
        }
        println!("seed {seed}: {parked} calls were parked");
        let left = settled(&cache, Duration::from_secs(1)).await;
        assert_eq!(left, InFlight::default(), "seed {seed}: still under way after the callers stopped");
        let recovered = until_hit(&cache, 41, Duration::from_secs(3)).await;
        println!("{:<40} first hit {recovered:.1?} after the load stopped", "random cancellations");
        let recovered = recovered.unwrap_or_else(|| panic!("seed {seed}: no hit within 3 s; {:?}", cache.stats()));
        assert!(recovered < Duration::from_secs(1), "seed {seed}: hits came back after {recovered:?}");
        // Every key the callers used answers at once: no lock or flight
        // left behind makes one wait.
        let locks: Vec<String> = redis::cmd("KEYS").arg("cancel:*#lock").query(&mut server.conn()).expect("KEYS");
        assert!(locks.is_empty(), "seed {seed}: stampede locks left behind: {locks:?}; {:?}", cache.stats());
        for id in 0..40 {
            let started = Instant::now();
            assert_eq!(value(&cache, id).await, id * 10);
            assert!(
                started.elapsed() < Duration::from_millis(100),
                "seed {seed}: key {id} took {:?}",
                started.elapsed()
            );
        }
    });
    let locks: Vec<String> = redis::cmd("KEYS").arg("cancel:*#lock").query(&mut server.conn()).expect("KEYS");
    let stats = cache.stats();
    println!("seed {seed}: {stats:?}; locks left {}", locks.len());
}

/// One process-wide cache used from several runtimes: multi-thread,
/// current-thread, created and dropped as `#[tokio::test]` does, some with
/// calls in flight when they go.
#[test]
fn a_process_wide_cache_serves_every_runtime() {
    let _serial = serial();
    let server = RedisServer::start();
    let cache = Cache::builder()
        .url(server.url())
        .key_prefix("runtimes")
        .command_timeout(Duration::from_millis(200))
        .connect_timeout(Duration::from_millis(200))
        .build()
        .expect("valid cache settings");
    cache_runtime::init(cache).expect("first init");
    let hits = || cache_runtime::stats().total.hits;
    for round in 0..6 {
        let runtime = if round % 2 == 0 {
            runtime()
        } else {
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
        };
        let before = hits();
        runtime.block_on(async {
            for id in 0..20 {
                let got = tokio::time::timeout(Duration::from_secs(1), global_value(id)).await;
                assert_eq!(got, Ok(id * 10), "round {round}: a call hung");
            }
        });
        if round > 0 {
            assert!(hits() >= before + 20, "round {round}: the entries stored earlier were not hits");
        }
        // Leave calls in flight as the runtime goes.
        for id in 0..64 {
            runtime.spawn(async move {
                loop {
                    global_value(id % 20).await;
                }
            });
        }
        runtime.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
        drop(runtime);
    }
    assert_eq!(cache_runtime::stats().in_flight, InFlight::default());
}

/// The local tier's invalidation listener is a background task: it must
/// not die with the runtime of the call that started it, or the tier goes
/// on serving entries that another process invalidated.
#[test]
fn the_local_tier_hears_invalidations_after_its_first_runtime_goes() {
    let _serial = serial();
    let server = RedisServer::start();
    let ours = support::patient_cache(&server.url(), "tier").local(100).build().expect("valid cache settings");
    let theirs = support::patient_cache(&server.url(), "tier").build().expect("valid cache settings");
    let db = Db::new(100);
    let until_local_hit = |runtime: &tokio::runtime::Runtime| {
        runtime.block_on(async {
            let started = Instant::now();
            loop {
                let local_hits = ours.stats().total.local_hits;
                tiered(&ours, &db, 1).await;
                if ours.stats().total.local_hits > local_hits {
                    return;
                }
                assert!(started.elapsed() < Duration::from_secs(3), "the local tier never answered");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let first = runtime();
    until_local_hit(&first);
    drop(first);
    let second = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    second.block_on(async {
        db.set(200);
        theirs.invalidate("tiered").await.expect("invalidate");
        let started = Instant::now();
        while tiered(&ours, &db, 1).await != 201 {
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "the local tier still serves an entry invalidated elsewhere; {:?}",
                ours.stats()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!("{:<40} invalidation seen after {:.1?}", "listener's runtime dropped", started.elapsed());
    });
    until_local_hit(&second);
}

/// A place's refill runs as a task on the runtime of the caller that found
/// the place empty. A current-thread runtime between two `block_on`s never
/// polls it: callers on another runtime must not wait on it for good, each
/// timing out on the connect deadline with Redis healthy.
#[test]
fn a_refill_left_on_an_idle_runtime_does_not_keep_its_place_empty() {
    use cache_runtime::Policy;
    use std::future::Future;
    let _serial = serial();
    let redis = RedisServer::start();
    let connect = Duration::from_millis(500);
    let cache = Cache::builder()
        .url(redis.url())
        .key_prefix("idle-refill")
        .pool_size(1)
        .connect_timeout(connect)
        .command_timeout(Duration::from_millis(250))
        .build()
        .expect("cache");
    let policy = Policy::new("idle").ttl(Duration::from_secs(60));
    let idle = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    idle.block_on(async {
        // The place is empty: this call starts its refill on this runtime,
        // and is polled once; the runtime then stops being driven before
        // the refill's task ever runs.
        let mut first = Box::pin(cache.get_or_compute(&policy, &"first", async { Ok::<_, std::io::Error>(1) }));
        let pending = std::future::poll_fn(|cx| std::task::Poll::Ready(first.as_mut().poll(cx).is_pending())).await;
        assert!(pending, "waiting for its connection");
    });
    support::run(Duration::from_secs(30), async {
        tokio::time::sleep(connect + Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        let computed = computations_of_three_calls(&cache, &policy).await;
        let stats = cache.stats().total;
        assert_eq!(computed, 1, "a refill on this runtime, then hits: {stats:?}");
        assert!(started.elapsed() < connect, "{:?} for three calls", started.elapsed());
    });
    drop(idle);
}

/// What [`bulk_call`] answers.
type Pairs = Result<Vec<(u32, u32)>, std::io::Error>;

/// A bulk call of two items, to be polled once and parked: it reads
/// outside the batcher, so it takes the breaker's probe or refills a
/// connection's place itself.
fn bulk_call<'a>(cache: &'a Cache, policy: &'a cache_runtime::Policy) -> impl std::future::Future<Output = Pairs> + 'a {
    cache
        .get_or_compute_many::<u32, u32, std::io::Error, _, std::collections::HashMap<u32, u32>, _, _, Vec<(u32, u32)>>(
            policy,
            [7u32, 8],
            |missing: Vec<u32>| async move { Ok(missing.into_iter().map(|k| (k, k)).collect()) },
        )
}

/// How many of three calls of one key computed: 1 when the cache works.
async fn computations_of_three_calls(cache: &Cache, policy: &cache_runtime::Policy) -> usize {
    let computed = std::sync::atomic::AtomicUsize::new(0);
    for _ in 0..3 {
        let value = async {
            computed.fetch_add(1, SeqCst);
            Ok::<_, std::io::Error>(4)
        };
        assert_eq!(cache.get_or_compute(policy, &"after", value).await.unwrap(), 4);
    }
    computed.load(SeqCst)
}
