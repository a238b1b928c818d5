//! Cold start: 64 tasks calling a function over 10,000 keys that are all
//! cold at first, the body a 1 ms `tokio::time::sleep` (a database answering
//! in 1 ms: waiting, not CPU, so it does not steal the 2 cores from the
//! clients). Each task draws its keys from a seeded generator, uniformly or
//! Zipf-skewed. Every call is recorded as a hit (the body did not run in it)
//! or a miss (it did: coalesced waiters count as hits, duplicate
//! computations as misses). Calls are ordered by completion and cut into
//! a sliding window of 5,000; the time to 99% is when the last 5,000 calls
//! first ran the body at most 50 times (1,000 calls were too few: at a 1%
//! miss rate, a window of 1,000 is under 1% by chance half the time).

use crate::harness::{
    BenchError, Product, bincode_config, builder, cpu_time, raw_connection, redis_cpu_time, report_errors, setting,
};
use cache_runtime::{Cache, cached};
use rand::{Rng, SeedableRng, rngs::StdRng};
use redis::AsyncCommands;
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

const WINDOW: usize = 5_000;

tokio::task_local! {
    /// Set by the body when it runs inside the call being recorded.
    static RAN: Cell<bool>;
}

static BODY_RUNS: AtomicU64 = AtomicU64::new(0);

/// The "database": 1 ms of waiting, then the row.
async fn body(id: u32) -> Product {
    let _ = RAN.try_with(|ran| ran.set(true));
    BODY_RUNS.fetch_add(1, Relaxed);
    tokio::time::sleep(Duration::from_millis(1)).await;
    Product::new(id)
}

#[cached(ttl = 3600, prefix = "grow_cold", cache = cache)]
async fn ours_cold(cache: &Cache, id: u32) -> Product {
    body(id).await
}

#[::cached::macros::concurrent_cached(
    redis = true,
    ttl_secs = 3600,
    map_error = r##"|e| BenchError(format!("{e:?}"))"##
)]
async fn theirs_cold(id: u32) -> Result<Product, BenchError> {
    Ok(body(id).await)
}

/// Draws key ids: uniform, or Zipf with exponent `s` (inverse CDF).
#[derive(Clone)]
enum Draw {
    Uniform(u32),
    Zipf(Arc<Vec<f64>>),
}

impl Draw {
    fn zipf(keys: u32, s: f64) -> Self {
        let mut cdf: Vec<f64> = (1..=keys).map(|k| 1.0 / f64::from(k).powf(s)).collect();
        let mut sum = 0.0;
        for w in &mut cdf {
            sum += *w;
            *w = sum;
        }
        cdf.iter_mut().for_each(|c| *c /= sum);
        Draw::Zipf(Arc::new(cdf))
    }

    fn next(&self, rng: &mut StdRng) -> u32 {
        match self {
            Draw::Uniform(keys) => rng.random_range(0..*keys),
            Draw::Zipf(cdf) => {
                let u: f64 = rng.random();
                cdf.partition_point(|&c| c < u).min(cdf.len() - 1) as u32
            }
        }
    }
}

/// What one contender's cold start measured.
struct Warmup {
    to_90: Option<Duration>,
    to_99: Option<Duration>,
    calls: usize,
    body_runs: u64,
    misses: usize,
    /// CPU time of this process and of Redis over the whole run.
    client_cpu: Duration,
    redis_cpu: Duration,
}

/// Runs `call` from `tasks` tasks drawing keys with `draw`, until a window
/// of calls is 99% hits (plus a little) or `GROW_COLD_MAX_MS` passes.
async fn warm<F, Fut>(tasks: usize, draw: &Draw, call: F) -> Warmup
where
    F: Fn(u32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let call = Arc::new(call);
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, misses) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let runs_before = BODY_RUNS.load(Relaxed);
    let (client_cpu, redis_cpu) = (cpu_time("self"), redis_cpu_time());
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (call, stop, draw) = (call.clone(), stop.clone(), draw.clone());
            let (calls, misses) = (calls.clone(), misses.clone());
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(t as u64);
                let mut done = Vec::with_capacity(50_000);
                while !stop.load(Relaxed) {
                    let id = draw.next(&mut rng);
                    let ran = RAN
                        .scope(Cell::new(false), async {
                            call(id).await;
                            RAN.with(Cell::get)
                        })
                        .await;
                    done.push((started.elapsed(), ran));
                    calls.fetch_add(1, Relaxed);
                    misses.fetch_add(u64::from(ran), Relaxed);
                }
                done
            })
        })
        .collect();
    // Stop soon after a window of calls was 99% hits, as seen from here.
    let max = Duration::from_millis(setting("GROW_COLD_MAX_MS", 20_000));
    let (mut window_calls, mut window_misses, mut reached) = (0, 0, None);
    let (mut last_calls, mut last_misses) = (0, 0);
    while started.elapsed() < max {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (c, m) = (calls.load(Relaxed), misses.load(Relaxed));
        window_calls += c - last_calls;
        window_misses += m - last_misses;
        (last_calls, last_misses) = (c, m);
        if window_calls >= WINDOW as u64 {
            if reached.is_none() && window_misses * 100 <= window_calls {
                reached = Some(started.elapsed());
            }
            (window_calls, window_misses) = (0, 0);
        }
        if reached.is_some_and(|at| started.elapsed() > at + Duration::from_millis(200)) {
            break;
        }
    }
    stop.store(true, Relaxed);
    let mut done = Vec::new();
    for handle in handles {
        done.extend(handle.await.expect("bench task"));
    }
    let (client_cpu, redis_cpu) = (cpu_time("self") - client_cpu, redis_cpu_time() - redis_cpu);
    done.sort();
    if setting("GROW_COLD_TIMELINE", 0) == 1 {
        timeline(&done);
    }
    // A sliding window over the calls in completion order: the first whose
    // last WINDOW calls ran the body at most (100 - percent)% of the time.
    let first_window = |hit_percent: usize| {
        let mut misses = 0;
        done.iter().enumerate().find_map(|(i, (at, ran))| {
            misses += usize::from(*ran);
            if i >= WINDOW {
                misses -= usize::from(done[i - WINDOW].1);
            }
            (i + 1 >= WINDOW && misses * 100 <= (100 - hit_percent) * WINDOW).then_some(*at)
        })
    };
    Warmup {
        to_90: first_window(90),
        to_99: first_window(99),
        calls: done.len(),
        body_runs: BODY_RUNS.load(Relaxed) - runs_before,
        misses: done.iter().filter(|(_, ran)| *ran).count(),
        client_cpu,
        redis_cpu,
    }
}

/// Calls and misses per 100 ms, for `GROW_COLD_TIMELINE=1`.
fn timeline(done: &[(Duration, bool)]) {
    let mut buckets: Vec<(usize, usize)> = Vec::new();
    for (at, ran) in done {
        let b = at.as_millis() as usize / 100;
        if buckets.len() <= b {
            buckets.resize(b + 1, (0, 0));
        }
        buckets[b].0 += 1;
        buckets[b].1 += usize::from(*ran);
    }
    let line: Vec<String> = buckets.iter().map(|(c, m)| format!("{c}/{m}")).collect();
    println!("  calls/misses per 100 ms: {}", line.join(" "));
}

pub async fn cold_start(server: &crate::support::RedisServer) {
    let keys: u32 = setting("GROW_COLD_KEYS", 10_000);
    let tasks: usize = setting("GROW_COLD_TASKS", 64);
    let s: f64 = setting("GROW_ZIPF", 0.99);
    let cache = builder(&server.url()).build().expect("cache");
    let mut admin = raw_connection(&server.url()).await;
    println!(
        "\nCold start: {tasks} tasks over {keys} cold keys, body = 1 ms tokio sleep; a sliding window of {WINDOW} calls \
         by completion time; a miss = a call that ran the body"
    );
    println!(
        "{:<10} {:<38} {:>9} {:>9} {:>9} {:>10} {:>17}",
        "keys", "contender", "to 90%", "to 99%", "calls", "body runs", "CPU client+redis"
    );
    for (label, draw) in [("uniform".to_owned(), Draw::Uniform(keys)), (format!("zipf {s}"), Draw::zipf(keys, s))] {
        let _: () = redis::cmd("FLUSHDB").query_async(&mut admin).await.expect("FLUSHDB");
        let c = cache.clone();
        let ours = warm(tasks, &draw, move |id| {
            let c = c.clone();
            async move {
                std::hint::black_box(ours_cold(&c, id).await);
            }
        })
        .await;
        let _: () = redis::cmd("FLUSHDB").query_async(&mut admin).await.expect("FLUSHDB");
        let theirs = warm(tasks, &draw, |id| async move {
            std::hint::black_box(theirs_cold(id).await.unwrap_or_else(|BenchError(why)| panic!("cached: {why}")));
        })
        .await;
        let _: () = redis::cmd("FLUSHDB").query_async(&mut admin).await.expect("FLUSHDB");
        let conn = admin.clone();
        let aside = warm(tasks, &draw, move |id| {
            let mut conn = conn.clone();
            async move {
                let key = format!("raw-cold:{id}");
                let hit: Option<Vec<u8>> = conn.get(&key).await.expect("GET");
                let product = match hit {
                    Some(bytes) => bincode::serde::decode_from_slice(&bytes, bincode_config()).expect("decode").0,
                    None => {
                        let product = body(id).await;
                        let bytes = bincode::serde::encode_to_vec(&product, bincode_config()).expect("encode");
                        let _: () = conn.pset_ex(&key, bytes, 3_600_000).await.expect("SET PX");
                        product
                    }
                };
                std::hint::black_box(product);
            }
        })
        .await;
        for (name, w) in [
            ("cache-runtime #[cached]", ours),
            ("cached 4 #[concurrent_cached(redis)]", theirs),
            ("raw cache-aside (GET; SET PX)", aside),
        ] {
            let at = |d: Option<Duration>| d.map_or_else(|| "never".to_owned(), |d| format!("{} ms", d.as_millis()));
            let cpu = format!("{}+{} ms", w.client_cpu.as_millis(), w.redis_cpu.as_millis());
            println!(
                "{:<10} {:<38} {:>9} {:>9} {:>9} {:>10} {:>17}",
                label,
                name,
                at(w.to_90),
                at(w.to_99),
                w.calls,
                w.body_runs,
                cpu
            );
            if w.misses as u64 != w.body_runs {
                println!("  ({} calls saw the body run in them: a body ran outside its caller's task)", w.misses);
            }
        }
    }
    let _: () = redis::cmd("FLUSHDB").query_async(&mut admin).await.expect("FLUSHDB");
    report_errors("cold start", &cache);
}
