//! What every section of the growth benchmark shares: its settings (read
//! from the environment), one timed row, and the ratio tables.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A setting from the environment, or its default when unset or unreadable.
pub fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// How long each row runs: `GROW_RUN_MS`, 1,000 ms by default.
pub fn run_time() -> Duration {
    Duration::from_millis(setting("GROW_RUN_MS", 1_000))
}

/// The task counts of the cost tables: `GROW_TASKS`, "1,64" by default.
pub fn task_counts() -> Vec<usize> {
    let text: String = setting("GROW_TASKS", "1,64".to_owned());
    text.split(',').filter_map(|t| t.trim().parse().ok()).filter(|&t| t > 0).collect()
}

/// Every cache of this benchmark: the raw client's connections wait up to
/// 10 s too. (The default 50 ms command timeout is for production: on a
/// loaded 2-core machine a few calls would time out and, with the breaker
/// open, answer from the body without Redis, flattering ours.)
pub fn builder(url: &str) -> cache_runtime::CacheBuilder {
    cache_runtime::Cache::builder().url(url).key_prefix("grow").command_timeout(Duration::from_secs(10))
}

/// A raw multiplexed connection with the same 10 s bound.
pub async fn raw_connection(url: &str) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
    let client = redis::Client::open(url).expect("redis url");
    client.get_multiplexed_async_connection_with_config(&config).await.expect("raw connection")
}

/// Says so when `cache` counted failures: its rows are then not all Redis.
pub fn report_errors(section: &str, cache: &cache_runtime::Cache) {
    let counts = cache.stats().total;
    if counts.errors() > 0 {
        println!("({section}: our cache counted {} errors, {counts:?})", counts.errors());
    }
}

pub fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Call numbers, unique in the whole run: a miss row's distinct keys.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// The redis-server whose CPU time rows report.
static REDIS_PID: OnceLock<u32> = OnceLock::new();

pub fn watch_redis(pid: u32) {
    let _ = REDIS_PID.set(pid);
}

/// CPU time a process's threads have run (`/proc/<pid>/task/*/schedstat`,
/// nanoseconds): who spent a row's time, the client or Redis, whatever
/// else the shared machine runs.
pub fn cpu_time(pid: &str) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Duration::ZERO };
    let ns: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

pub fn redis_cpu_time() -> Duration {
    REDIS_PID.get().map_or(Duration::ZERO, |pid| cpu_time(&pid.to_string()))
}

/// One timed row.
#[derive(Clone, Copy)]
pub struct Row {
    pub ops: u64,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    /// CPU time of this process (all its threads) and of Redis in the row.
    pub client_cpu: Duration,
    pub redis_cpu: Duration,
}

impl Row {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// Two halves of one row: throughput over both, the mean of their
    /// medians, the worse p99.
    pub fn joined(self, other: Row) -> Row {
        Row {
            ops: self.ops + other.ops,
            elapsed: self.elapsed + other.elapsed,
            p50: (self.p50 + other.p50) / 2,
            p99: self.p99.max(other.p99),
            client_cpu: self.client_cpu + other.client_cpu,
            redis_cpu: self.redis_cpu + other.redis_cpu,
        }
    }

    /// CPU per call, client + Redis, in µs.
    pub fn cpu_per_op(&self) -> String {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / self.ops.max(1) as f64;
        format!("{:.1}+{:.1}", per(self.client_cpu), per(self.redis_cpu))
    }
}

/// Runs `call(n)` from `tasks` concurrent tasks for `run_time()` or until
/// `max_ops` calls have started (a bound on what large misses write to
/// Redis); `n` is unique in the whole run.
pub async fn measure<F, Fut>(tasks: usize, max_ops: u64, call: F) -> Row
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    measure_for(run_time(), tasks, max_ops, call).await
}

/// Ours and the raw client on the same work, in the order ours, raw, raw,
/// ours, each for half a row's time (and half of `max_ops`): on a shared
/// machine whose load drifts within seconds, both sides see the same drift.
pub async fn pair<A, AF, B, BF>(tasks: usize, max_ops: u64, ours: A, raw: B) -> (Row, Row)
where
    A: Fn(u64) -> AF + Clone + Send + Sync + 'static,
    AF: Future<Output = ()> + Send,
    B: Fn(u64) -> BF + Clone + Send + Sync + 'static,
    BF: Future<Output = ()> + Send,
{
    let (half, max) = (run_time() / 2, max_ops.div_ceil(2));
    let a1 = measure_for(half, tasks, max, ours.clone()).await;
    let b1 = measure_for(half, tasks, max, raw.clone()).await;
    let b2 = measure_for(half, tasks, max, raw).await;
    let a2 = measure_for(half, tasks, max, ours).await;
    (a1.joined(a2), b1.joined(b2))
}

pub async fn measure_for<F, Fut>(run: Duration, tasks: usize, max_ops: u64, call: F) -> Row
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let call = Arc::new(call);
    let stop = Arc::new(AtomicBool::new(false));
    let started_at = SEQUENCE.load(Relaxed);
    let (client_cpu, redis_cpu) = (cpu_time("self"), redis_cpu_time());
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (call, stop) = (call.clone(), stop.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(10_000);
                while !stop.load(Relaxed) {
                    let n = SEQUENCE.fetch_add(1, Relaxed);
                    if n - started_at >= max_ops {
                        break;
                    }
                    let t0 = Instant::now();
                    call(n).await;
                    latencies.push(t0.elapsed());
                    tokio::task::consume_budget().await;
                }
                latencies
            })
        })
        .collect();
    let deadline = started + run;
    while Instant::now() < deadline && SEQUENCE.load(Relaxed) - started_at < max_ops {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Relaxed);
    let mut latencies = Vec::new();
    for handle in handles {
        latencies.extend(handle.await.expect("bench task"));
    }
    let elapsed = started.elapsed();
    let (client_cpu, redis_cpu) = (cpu_time("self") - client_cpu, redis_cpu_time() - redis_cpu);
    latencies.sort();
    let at = |q: f64| latencies.get(((latencies.len().max(1) - 1) as f64 * q) as usize).copied().unwrap_or_default();
    Row { ops: latencies.len() as u64, elapsed, p50: at(0.5), p99: at(0.99), client_cpu, redis_cpu }
}

/// One line of a ratio table: ours and the raw client on the same work.
pub struct Pair {
    pub what: String,
    pub tasks: usize,
    pub ours: Row,
    pub raw: Row,
}

/// Prints `pairs` as ours against the raw client: throughput and p50, and
/// their ratios (ours ÷ raw; ops/s × above 1 and p50 × below 1 favour ours),
/// and the CPU each call cost in this process and in Redis (µs).
pub fn print_pairs(title: &str, what: &str, pairs: &[Pair]) {
    print_pairs_as(title, what, ("ours", "raw"), pairs);
}

/// [`print_pairs`] with other names for the two sides.
pub fn print_pairs_as(title: &str, what: &str, (a, b): (&str, &str), pairs: &[Pair]) {
    println!("\n{title}");
    println!(
        "{:<22} {:>5} {:>10} {:>10} {:>7} {:>9} {:>9} {:>7} {:>12} {:>12}",
        what,
        "tasks",
        format!("{a} op/s"),
        format!("{b} op/s"),
        "op/s ×",
        format!("{a} p50"),
        format!("{b} p50"),
        "p50 ×",
        format!("{a} CPU c+r"),
        format!("{b} CPU c+r")
    );
    for p in pairs {
        println!(
            "{:<22} {:>5} {:>10.0} {:>10.0} {:>7.2} {:>9.1?} {:>9.1?} {:>7.2} {:>12} {:>12}",
            p.what,
            p.tasks,
            p.ours.ops_per_sec(),
            p.raw.ops_per_sec(),
            p.ours.ops_per_sec() / p.raw.ops_per_sec(),
            p.ours.p50,
            p.raw.p50,
            p.ours.p50.as_secs_f64() / p.raw.p50.as_secs_f64(),
            p.ours.cpu_per_op(),
            p.raw.cpu_per_op()
        );
    }
}

/// The value the benchmarks cache (benches/common/product.rs).
pub use crate::product::Product;

#[derive(Debug, Clone)]
pub struct BenchError(pub String);
