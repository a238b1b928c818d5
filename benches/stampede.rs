//! One cold key, 1,000 concurrent callers, a 50 ms body: how many times
//! does the body run, and how long do callers wait? This crate next to the
//! `cached` crate's Redis store (`#[concurrent_cached(redis = true)]`), in
//! one run against one private redis-server.
//!
//! ```text
//! cargo bench --bench stampede
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use cache_runtime::{Cache, cached};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

const CALLERS: usize = 1_000;
const BODY: Duration = Duration::from_millis(50);
const ROUNDS: u64 = 3;

static OURS_RUNS: AtomicUsize = AtomicUsize::new(0);
static THEIRS_RUNS: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, Clone)]
struct BenchError(String);

#[cached(ttl = 300, prefix = "bench_stampede", cache = cache)]
async fn ours(cache: &Cache, round: u64) -> Result<String, BenchError> {
    OURS_RUNS.fetch_add(1, SeqCst);
    tokio::time::sleep(BODY).await;
    Ok(format!("report {round}"))
}

#[::cached::macros::concurrent_cached(
    redis = true,
    ttl_secs = 300,
    map_error = r##"|e| BenchError(format!("{e:?}"))"##
)]
async fn theirs(round: u64) -> Result<String, BenchError> {
    THEIRS_RUNS.fetch_add(1, SeqCst);
    tokio::time::sleep(BODY).await;
    Ok(format!("report {round}"))
}

struct Figures {
    runs: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    errors: usize,
}

async fn stampede<F, Fut>(call: F, runs: &AtomicUsize) -> Figures
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<String, BenchError>> + Send + 'static,
{
    let before = runs.load(SeqCst);
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let call = call();
            tokio::spawn(async move {
                let started = Instant::now();
                let outcome = call.await;
                if let Err(BenchError(why)) = &outcome {
                    eprintln!("caller error: {why}");
                }
                (started.elapsed(), outcome.is_ok())
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(CALLERS);
    let mut errors = 0;
    for task in tasks {
        let (latency, ok) = task.await.expect("caller panicked");
        latencies.push(latency);
        errors += usize::from(!ok);
    }
    latencies.sort();
    Figures {
        runs: runs.load(SeqCst) - before,
        p50: latencies[CALLERS / 2],
        p99: latencies[CALLERS * 99 / 100],
        max: latencies[CALLERS - 1],
        errors,
    }
}

fn main() {
    let server = support::RedisServer::start();
    // The `cached` crate reads its Redis URL from the environment, once.
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("CACHED_REDIS_CONNECTION_STRING", server.url()) };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let cache = Cache::builder().url(server.url()).key_prefix("bench").build().expect("cache");
        // Warm both clients' connections on another key.
        let _ = ours(&cache, u64::MAX).await;
        let _ = theirs(u64::MAX).await;

        println!("One cold key, {CALLERS} concurrent callers, a {BODY:?} body, {ROUNDS} rounds each\n");
        println!("{:<34} {:>12} {:>10} {:>10} {:>10} {:>7}", "", "body runs", "p50", "p99", "max", "errors");
        for round in 0..ROUNDS {
            let cache = cache.clone();
            let o = stampede(
                || {
                    let cache = cache.clone();
                    async move { ours(&cache, round).await }
                },
                &OURS_RUNS,
            )
            .await;
            let t = stampede(|| theirs(round), &THEIRS_RUNS).await;
            for (name, f) in [("cache-runtime #[cached]", o), ("cached 4 #[concurrent_cached(redis)]", t)] {
                println!(
                    "{name:<34} {:>12} {:>10.1?} {:>10.1?} {:>10.1?} {:>7}",
                    f.runs, f.p50, f.p99, f.max, f.errors
                );
            }
        }
    });
}
