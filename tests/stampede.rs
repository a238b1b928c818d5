//! Stampede protection with real processes and a real Redis: one
//! computation per cold key, and nobody hangs when the computing caller
//! fails, is dropped or is killed.

mod support;

use cache_runtime::{Cache, cached};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::{AsyncConn, RedisServer, Topology, run};

const DEADLINE: Duration = Duration::from_secs(60);
const RUNS_KEY: &str = "test:body-runs";

fn cache_for(url: &str, lock_timeout: Duration) -> Cache {
    support::patient_cache(url, "stampede")
        .pool_size(4)
        .lock_timeout(lock_timeout)
        .build()
        .expect("valid cache settings")
}

async fn counter_connection(url: &str) -> AsyncConn {
    Topology::async_conn(url).await
}

/// The expensive function: counts its runs in Redis, across processes.
#[cached(ttl = 600, prefix = "report", skip(runs, work), cache = cache)]
async fn report(cache: &Cache, runs: &AsyncConn, work: Duration, id: u64) -> String {
    let _: i64 = runs.query(redis::cmd("INCR").arg(RUNS_KEY)).await.expect("count the run");
    println!("computing {id}");
    tokio::time::sleep(work).await;
    format!("report {id}")
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Re-executed with CACHE_TEST_ROLE set, this test binary is the other
/// process: `stampede` runs 250 concurrent callers at a given instant;
/// `hold` computes a key for a long time and never finishes on its own.
#[test]
fn helper_process() {
    let (Ok(role), Ok(url)) = (std::env::var("CACHE_TEST_ROLE"), std::env::var("CACHE_TEST_URL")) else { return };
    run(DEADLINE, async {
        let runs = counter_connection(&url).await;
        match role.as_str() {
            "stampede" => {
                let cache = cache_for(&url, Duration::from_secs(10));
                let start_at: u64 = std::env::var("CACHE_TEST_START_AT").unwrap().parse().unwrap();
                tokio::time::sleep(Duration::from_millis(start_at.saturating_sub(unix_ms()))).await;
                let tasks: Vec<_> = (0..250)
                    .map(|_| {
                        let (cache, runs) = (cache.clone(), runs.clone());
                        tokio::spawn(async move { report(&cache, &runs, Duration::from_millis(200), 1).await })
                    })
                    .collect();
                let mut right = 0;
                for task in tasks {
                    if task.await.expect("caller did not panic") == "report 1" {
                        right += 1;
                    }
                }
                println!("right answers: {right}");
            }
            "hold" => {
                let cache = cache_for(&url, Duration::from_secs(1));
                report(&cache, &runs, Duration::from_secs(30), 2).await;
            }
            other => panic!("unknown role {other}"),
        }
    });
}

fn helper(role: &str, url: &str, extra_env: &[(&str, String)]) -> Child {
    let mut command = Command::new(std::env::current_exe().expect("test binary path"));
    command
        .args(["--exact", "helper_process", "--nocapture", "--test-threads=1"])
        .env("CACHE_TEST_ROLE", role)
        .env("CACHE_TEST_URL", url)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (name, value) in extra_env {
        command.env(name, value);
    }
    command.spawn().expect("spawn a helper process")
}

/// Waits for a helper with a hard deadline; kills it (by pid) on timeout.
fn finish(mut child: Child, deadline: Duration) -> String {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("poll the helper") {
            let mut out = String::new();
            if let Some(stdout) = child.stdout.take() {
                for line in BufReader::new(stdout).lines() {
                    out.push_str(&line.unwrap_or_default());
                    out.push('\n');
                }
            }
            assert!(status.success(), "helper failed: {out}");
            return out;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("helper exceeded its {deadline:?} deadline");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn body_runs(server: &Topology) -> i64 {
    redis::cmd("GET").arg(RUNS_KEY).query::<Option<i64>>(&mut server.conn()).unwrap().unwrap_or(0)
}

fn four_processes_of_250_callers_run_the_body_once(server: &Topology) {
    let start_at = (unix_ms() + 1500).to_string();
    let helpers: Vec<Child> =
        (0..4).map(|_| helper("stampede", &server.url(), &[("CACHE_TEST_START_AT", start_at.clone())])).collect();
    for child in helpers {
        let out = finish(child, Duration::from_secs(45));
        assert!(out.contains("right answers: 250"), "every caller gets the value: {out}");
    }
    assert_eq!(body_runs(server), 1, "1,000 callers in 4 processes, one computation");
}

fn a_dropped_leader_is_replaced_at_once(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(&server.url(), Duration::from_secs(10));
        let runs = counter_connection(&server.url()).await;
        let work = Duration::from_millis(300);
        let leader = {
            let (cache, runs) = (cache.clone(), runs.clone());
            tokio::spawn(async move { report(&cache, &runs, work, 3).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waiters: Vec<_> = (0..20)
            .map(|_| {
                let (cache, runs) = (cache.clone(), runs.clone());
                tokio::spawn(async move { report(&cache, &runs, work, 3).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The HTTP client went away: the computing future is dropped.
        leader.abort();
        let started = Instant::now();
        for waiter in waiters {
            assert_eq!(waiter.await.unwrap(), "report 3");
        }
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    });
    let runs = body_runs(server);
    assert!((1..=2).contains(&runs), "the body ran {runs} times");
    assert_eq!(runs, 2, "the dropped leader's run and the one that replaced it");
}

fn a_killed_process_delays_others_at_most_the_lock_ttl(server: &Topology) {
    let lock_ttl = Duration::from_secs(1);
    let mut holder = helper("hold", &server.url(), &[]);
    // Wait until the other process is computing, so it holds the lock.
    let mut first_line = String::new();
    let stdout = holder.stdout.take().expect("piped stdout");
    let mut reader = BufReader::new(stdout);
    let waited = Instant::now();
    while !first_line.contains("computing 2") {
        first_line.clear();
        assert!(reader.read_line(&mut first_line).unwrap_or(0) > 0, "the holder exited early");
        assert!(waited.elapsed() < Duration::from_secs(20), "the holder never started computing");
    }
    let locked_at = Instant::now();
    run(DEADLINE, async {
        let cache = cache_for(&server.url(), lock_ttl);
        let runs = counter_connection(&server.url()).await;
        let work = Duration::from_millis(100);
        let callers: Vec<_> = (0..50)
            .map(|_| {
                let (cache, runs) = (cache.clone(), runs.clone());
                tokio::spawn(async move { report(&cache, &runs, work, 2).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        holder.kill().expect("SIGKILL the holder by pid");
        let _ = holder.wait();
        for caller in callers {
            assert_eq!(caller.await.unwrap(), "report 2");
        }
        let took = locked_at.elapsed();
        let bound = lock_ttl + work + Duration::from_millis(500);
        assert!(took < bound, "callers finished after {took:?}, more than the lock TTL plus one computation");
        assert!(cache.stats().total.lock_waits >= 1, "{:?}", cache.stats());
    });
    assert_eq!(body_runs(server), 2, "the killed computation and one more");
}

#[cached(ttl = 600, prefix = "flaky", skip(calls), cache = cache)]
async fn flaky(cache: &Cache, calls: &AtomicUsize, id: u64) -> Result<String, String> {
    let call = calls.fetch_add(1, SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    if call == 0 { Err(format!("db timeout for {id}")) } else { Ok(format!("row {id}")) }
}

fn an_err_from_the_leader_is_not_shared_and_a_waiter_takes_over(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(&server.url(), Duration::from_secs(10));
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move { flaky(&cache, &calls, 4).await })
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }
        let errors = results.iter().filter(|r| r.is_err()).count();
        assert_eq!(errors, 1, "only the failing leader sees its Err: {results:?}");
        assert!(results.iter().filter_map(|r| r.as_ref().ok()).all(|v| v == "row 4"));
        assert_eq!(calls.load(SeqCst), 2, "one failed run, one successful take-over");
        assert_eq!(flaky(&cache, &calls, 4).await, Ok("row 4".to_owned()));
        assert_eq!(calls.load(SeqCst), 2, "the Ok is cached, the Err never was");
    });
}

#[cached(ttl = 600, prefix = "catalog", skip(version, calls), cache = cache)]
async fn catalog(cache: &Cache, version: &AtomicUsize, calls: &AtomicUsize) -> usize {
    calls.fetch_add(1, SeqCst);
    let seen = version.load(SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    seen
}

fn waiters_never_get_a_value_an_invalidate_made_stale(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(&server.url(), Duration::from_secs(10));
        let (version, calls) = (AtomicUsize::new(1), AtomicUsize::new(0));
        let (leader, waiter, ()) = tokio::join!(
            catalog(&cache, &version, &calls),
            async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                catalog(&cache, &version, &calls).await
            },
            async {
                tokio::time::sleep(Duration::from_millis(150)).await;
                version.store(2, SeqCst);
                cache.invalidate("catalog").await.unwrap();
            }
        );
        assert_eq!(leader, 1, "the leader returns what it computed");
        assert_eq!(waiter, 2, "a waiter after the invalidate gets a fresh value, not the leader's");
        assert_eq!(calls.load(SeqCst), 2);
        assert_eq!(catalog(&cache, &version, &calls).await, 2);
    });
}

#[cached(ttl = 600, prefix = "offline", skip(calls), cache = cache)]
async fn offline(cache: &Cache, calls: &AtomicUsize, id: u64) -> u64 {
    calls.fetch_add(1, SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    id * 10
}

#[test]
fn with_redis_down_concurrent_callers_still_share_one_computation() {
    run(DEADLINE, async {
        let cache = Cache::builder()
            .url(RedisServer::dead_url())
            .connect_timeout(Duration::from_millis(100))
            .command_timeout(Duration::from_millis(100))
            .build()
            .unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move { offline(&cache, &calls, 5).await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), 50);
        }
        assert_eq!(calls.load(SeqCst), 1, "no Redis, no lock, but one computation in this process");
        assert_eq!(cache.stats().total.coalesced, 49);
    });
}

on_every_topology!(
    four_processes_of_250_callers_run_the_body_once,
    a_dropped_leader_is_replaced_at_once,
    a_killed_process_delays_others_at_most_the_lock_ttl,
    an_err_from_the_leader_is_not_shared_and_a_waiter_takes_over,
    waiters_never_get_a_value_an_invalidate_made_stale,
);
