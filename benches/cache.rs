//! The hit path, the miss path, a stampede, a dead Redis and the CPU cost of
//! keys and codecs, each measured side by side in one run against one
//! private redis-server, so machine noise cancels out in the ratios.
//!
//! ```text
//! cargo bench --bench cache
//! ```

#[path = "common/product.rs"]
mod product;
#[path = "../tests/support/mod.rs"]
mod support;
use product::Product;

use cache_runtime::__private::KeyHasher;
use cache_runtime::{Cache, cached};
use redis::AsyncCommands;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

const KEYS: u32 = 1_000;
const RUN: Duration = Duration::from_secs(2);

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

#[derive(Debug, Clone)]
struct BenchError(String);

#[cached(ttl = 3600, prefix = "bench_hit", cache = cache)]
async fn ours(cache: &Cache, id: u32) -> Product {
    Product::new(id)
}

#[cached(ttl = 3600, prefix = "bench_local", local = true, cache = cache)]
async fn ours_local(cache: &Cache, id: u32) -> Product {
    Product::new(id)
}

#[cached(ttl = 3600, prefix = "bench_memory", cache = cache)]
async fn ours_memory(cache: &Cache, id: u32) -> Product {
    Product::new(id)
}

#[cached(ttl = 3600, prefix = "bench_miss", cache = cache)]
async fn ours_miss(cache: &Cache, id: u64) -> Product {
    Product::new(id as u32)
}

#[cached(ttl = 3600, prefix = "bench_miss_unlocked", lock = false, cache = cache)]
async fn ours_miss_unlocked(cache: &Cache, id: u64) -> Product {
    Product::new(id as u32)
}

#[::cached::macros::concurrent_cached(
    redis = true,
    ttl_secs = 3600,
    map_error = r##"|e| BenchError(format!("{e:?}"))"##
)]
async fn theirs(id: u32) -> Result<Product, BenchError> {
    Ok(Product::new(id))
}

/// One benchmark row.
struct Row {
    name: String,
    tasks: usize,
    ops: u64,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
}

impl Row {
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `call` from `tasks` concurrent tasks for `RUN`, on keys spread
/// over the pre-warmed set.
async fn measure<F, Fut>(name: &str, tasks: usize, call: F) -> Row
where
    F: Fn(u32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    measure_for(name, tasks, RUN, call).await
}

/// [`measure`] for `run` instead of `RUN`.
async fn measure_for<F, Fut>(name: &str, tasks: usize, run: Duration, call: F) -> Row
where
    F: Fn(u32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let call = Arc::new(call);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (call, stop) = (call.clone(), stop.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(100_000);
                let mut id = (t as u32 * 7919) % KEYS;
                while !stop.load(Relaxed) {
                    id = (id * 21 + 13) % KEYS;
                    let t0 = Instant::now();
                    call(id).await;
                    latencies.push(t0.elapsed());
                    // An in-process hit never waits, so nothing else would
                    // yield to the scheduler (nor let the timer stop the run).
                    tokio::task::consume_budget().await;
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(run).await;
    stop.store(true, Relaxed);
    let mut latencies = Vec::new();
    for handle in handles {
        latencies.extend(handle.await.expect("bench task"));
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    Row { name: name.to_owned(), tasks, ops: latencies.len() as u64, elapsed, p50: at(0.5), p99: at(0.99) }
}

/// `redis-benchmark -t get` at `clients` connections: the server's ceiling.
fn redis_benchmark(port: u16, clients: usize, pipeline: usize) -> Option<Row> {
    let requests = if clients == 1 { 20_000 } else { 200_000 };
    let output = std::process::Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "get", "-r", "1000", "-d", "100", "--csv"])
        .args(["-c", &clients.to_string(), "-n", &requests.to_string(), "-P", &pipeline.to_string()])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let line = text.lines().find(|l| l.starts_with("\"GET\""))?;
    let fields: Vec<f64> = line.split(',').skip(1).filter_map(|f| f.trim_matches('"').parse().ok()).collect();
    let ms = |v: f64| Duration::from_secs_f64(v / 1000.0);
    let name =
        if pipeline > 1 { format!("redis-benchmark -t get -P {pipeline}") } else { "redis-benchmark -t get".into() };
    Some(Row {
        name,
        tasks: clients,
        ops: fields[0] as u64,
        elapsed: Duration::from_secs(1),
        p50: ms(fields[3]),
        p99: ms(fields[5]),
    })
}

fn print_table(title: &str, rows: &[Row], baseline: &str) {
    println!("\n{title}");
    println!("{:<44} {:>5} {:>11} {:>9} {:>9} {:>9} {:>9}", "", "tasks", "ops/s", "p50", "p99", "ops/s ×", "p50 ×");
    for row in rows {
        let base = rows.iter().find(|r| r.name == baseline && r.tasks == row.tasks);
        let (ops_ratio, p50_ratio) = match base {
            Some(b) => (row.ops_per_sec() / b.ops_per_sec(), row.p50.as_secs_f64() / b.p50.as_secs_f64()),
            None => (f64::NAN, f64::NAN),
        };
        println!(
            "{:<44} {:>5} {:>11.0} {:>9.1?} {:>9.1?} {:>9.2} {:>9.2}",
            row.name,
            row.tasks,
            row.ops_per_sec(),
            row.p50,
            row.p99,
            ops_ratio,
            p50_ratio
        );
    }
}

const RAW_MUX: &str = "raw redis-rs multiplexed GET + bincode";

async fn hit_path(server: &support::RedisServer, cache: &Cache) -> Vec<Row> {
    // Warm every contender's entries for the same 1,000 ids.
    let mut raw = redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    for id in 0..KEYS {
        ours(cache, id).await;
        let _ = theirs(id).await;
        let bytes = bincode::serde::encode_to_vec(Product::new(id), bincode_config()).unwrap();
        let _: () = raw.set(format!("raw:{id}"), bytes).await.unwrap();
    }
    let keys: Arc<Vec<String>> = Arc::new((0..KEYS).map(|id| format!("raw:{id}")).collect());
    let pool = deadpool_redis::Config::from_url(server.url())
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .expect("deadpool-redis pool");

    let mut rows = Vec::new();
    for tasks in [1, 64] {
        let c = cache.clone();
        rows.push(
            measure("cache-runtime #[cached] hit", tasks, move |id| {
                let c = c.clone();
                async move {
                    black_box(ours(&c, id).await);
                }
            })
            .await,
        );
        let (conn, k) = (raw.clone(), keys.clone());
        rows.push(
            measure(RAW_MUX, tasks, move |id| {
                let (mut conn, k) = (conn.clone(), k.clone());
                async move {
                    let bytes: Vec<u8> = conn.get(&k[id as usize]).await.unwrap();
                    let (p, _): (Product, usize) = bincode::serde::decode_from_slice(&bytes, bincode_config()).unwrap();
                    black_box(p);
                }
            })
            .await,
        );
        let (p, k) = (pool.clone(), keys.clone());
        rows.push(
            measure("raw deadpool-redis (stock) GET + bincode", tasks, move |id| {
                let (p, k) = (p.clone(), k.clone());
                async move {
                    let mut conn = p.get().await.unwrap();
                    let bytes: Vec<u8> = conn.get(&k[id as usize]).await.unwrap();
                    let (p, _): (Product, usize) = bincode::serde::decode_from_slice(&bytes, bincode_config()).unwrap();
                    black_box(p);
                }
            })
            .await,
        );
        rows.push(
            measure("cached 4 #[concurrent_cached(redis)] hit", tasks, |id| async move {
                black_box(theirs(id).await.unwrap_or_else(|BenchError(why)| panic!("cached crate failed: {why}")));
            })
            .await,
        );
        rows.extend(redis_benchmark(server.port(), tasks, 1));
    }
    rows.extend(redis_benchmark(server.port(), 64, 16));
    rows
}

/// Rounds of [`alternating`], and how long each contender runs in one.
const ROUNDS: usize = 8;
const ROUND: Duration = Duration::from_millis(500);

/// CPU time a process has used, in clock ticks (user + system, from
/// `/proc/<pid>/stat`); 0 where there is no procfs.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may hold spaces: state is the
    // first, utime the 12th, stime the 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    after.split_whitespace().skip(11).take(2).filter_map(|f| f.parse::<u64>().ok()).sum()
}

/// One contender's totals over the rounds of [`alternating`].
#[derive(Default)]
struct Totals {
    hits: u64,
    client_ticks: u64,
    server_ticks: u64,
}

impl Totals {
    /// Microseconds of CPU per hit, client and Redis (ticks are 10 ms).
    fn per_hit(&self) -> (f64, f64) {
        let us = |ticks: u64| ticks as f64 * 10_000.0 / self.hits.max(1) as f64;
        (us(self.client_ticks), us(self.server_ticks))
    }
}

/// Our hit against the `cached` crate's at `tasks` tasks, in short rounds
/// that alternate which goes first: each round's ratio of throughputs, and
/// each contender's CPU. The load of this shared machine drifts within
/// seconds (other builds and benchmarks), so two 2 s rows a few seconds
/// apart can see different machines; two adjacent 0.5 s runs see nearly the
/// same one, and the median of the rounds is the ratio to quote. CPU per
/// hit moves much less with the load than throughput does. Both
/// contenders' keys must be warm.
async fn alternating(server: &support::RedisServer, cache: &Cache, tasks: usize) -> (Vec<f64>, [Totals; 2]) {
    let mut ratios = Vec::with_capacity(ROUNDS);
    let mut totals = [Totals::default(), Totals::default()];
    let (me, redis) = (std::process::id(), server.pid());
    for round in 0..ROUNDS {
        let mut rows = Vec::with_capacity(2);
        // Ours first in even rounds, theirs first in odd ones.
        for which in [round % 2, 1 - round % 2] {
            let (client, server) = (cpu_ticks(me), cpu_ticks(redis));
            let row = if which == 0 {
                let c = cache.clone();
                measure_for("ours", tasks, ROUND, move |id| {
                    let c = c.clone();
                    async move {
                        black_box(ours(&c, id).await);
                    }
                })
                .await
            } else {
                measure_for("theirs", tasks, ROUND, |id| async move {
                    black_box(theirs(id).await.unwrap_or_else(|BenchError(why)| panic!("cached crate failed: {why}")));
                })
                .await
            };
            let total = &mut totals[which];
            total.hits += row.ops;
            total.client_ticks += cpu_ticks(me).saturating_sub(client);
            total.server_ticks += cpu_ticks(redis).saturating_sub(server);
            rows.push((which, row.ops_per_sec()));
        }
        rows.sort_by_key(|(which, _)| *which);
        ratios.push(rows[0].1 / rows[1].1);
    }
    (ratios, totals)
}

/// One line: the median of `ratios`, each round's, and CPU per hit.
fn print_alternating(tasks: usize, (ratios, totals): &(Vec<f64>, [Totals; 2])) {
    let mut sorted = ratios.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = (sorted[(sorted.len() - 1) / 2] + sorted[sorted.len() / 2]) / 2.0;
    let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    let ((ours_client, ours_server), (theirs_client, theirs_server)) = (totals[0].per_hit(), totals[1].per_hit());
    println!(
        "#[cached] / cached 4 hits, {tasks} tasks, {ROUNDS} alternating rounds of {ROUND:?}: median {median:.2} \
         (rounds: {}); CPU per hit, client + Redis: ours {ours_client:.1} + {ours_server:.1} µs, theirs \
         {theirs_client:.1} + {theirs_server:.1} µs: {:.2}x",
        each.join(" "),
        (theirs_client + theirs_server) / (ours_client + ours_server),
    );
}

#[cfg(feature = "cluster")]
const RAW_CLUSTER: &str = "raw redis-rs cluster GET + bincode";

/// Hits on a private 3-master Redis Cluster, against redis-rs's own cluster
/// connection reading keys of one slot (a namespace lives in one slot).
#[cfg(feature = "cluster")]
async fn cluster_hit_path(cluster: &support::RedisCluster) -> Vec<Row> {
    let cache = Cache::builder().cluster(cluster.urls()).key_prefix("bench").build().expect("cache");
    let client = redis::cluster::ClusterClient::new(cluster.urls()).expect("cluster client");
    let raw = client.get_async_connection().await.expect("cluster connection");
    let keys: Arc<Vec<String>> = Arc::new((0..KEYS).map(|id| format!("raw:{{bench}}:{id}")).collect());
    for id in 0..KEYS {
        ours(&cache, id).await;
        let bytes = bincode::serde::encode_to_vec(Product::new(id), bincode_config()).unwrap();
        let _: () = raw.clone().set(&keys[id as usize], bytes).await.unwrap();
    }
    let mut rows = Vec::new();
    for tasks in [1, 64] {
        let c = cache.clone();
        rows.push(
            measure("cache-runtime #[cached] hit, cluster", tasks, move |id| {
                let c = c.clone();
                async move {
                    black_box(ours(&c, id).await);
                }
            })
            .await,
        );
        let (conn, k) = (raw.clone(), keys.clone());
        rows.push(
            measure(RAW_CLUSTER, tasks, move |id| {
                let (mut conn, k) = (conn.clone(), k.clone());
                async move {
                    let bytes: Vec<u8> = conn.get(&k[id as usize]).await.unwrap();
                    let (p, _): (Product, usize) = bincode::serde::decode_from_slice(&bytes, bincode_config()).unwrap();
                    black_box(p);
                }
            })
            .await,
        );
    }
    let stats = cache.stats().total;
    assert_eq!(stats.errors(), 0, "{stats:?}");
    rows
}

const RAW_MOKA: &str = "raw moka get + bincode";

/// Hits answered in process: the local tier in front of Redis, a
/// memory-only cache, and their floor (moka and bincode alone); the Redis
/// hit for scale.
async fn local_path(server: &support::RedisServer, cache: &Cache) -> Vec<Row> {
    let tiered = Cache::builder().url(server.url()).key_prefix("bench_tiered").local(10_000).build().expect("cache");
    let memory = Cache::builder().key_prefix("bench_memory").build().expect("memory-only cache");
    let raw: moka::sync::Cache<u32, Arc<Vec<u8>>> = moka::sync::Cache::new(10_000);
    for id in 0..KEYS {
        ours_local(&tiered, id).await;
        ours_memory(&memory, id).await;
        raw.insert(id, Arc::new(bincode::serde::encode_to_vec(Product::new(id), bincode_config()).unwrap()));
    }
    // The tier is trusted once its invalidation channel is subscribed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tiered.stats().total.local_hits == 0 && Instant::now() < deadline {
        ours_local(&tiered, 0).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut rows = Vec::new();
    for tasks in [1, 64] {
        let c = tiered.clone();
        rows.push(
            measure("cache-runtime local tier hit (local = true)", tasks, move |id| {
                let c = c.clone();
                async move {
                    black_box(ours_local(&c, id).await);
                }
            })
            .await,
        );
        let c = memory.clone();
        rows.push(
            measure("cache-runtime memory-only hit", tasks, move |id| {
                let c = c.clone();
                async move {
                    black_box(ours_memory(&c, id).await);
                }
            })
            .await,
        );
        let r = raw.clone();
        rows.push(
            measure(RAW_MOKA, tasks, move |id| {
                let r = r.clone();
                async move {
                    let bytes = r.get(&id).unwrap();
                    let (p, _): (Product, usize) = bincode::serde::decode_from_slice(&bytes, bincode_config()).unwrap();
                    black_box(p);
                }
            })
            .await,
        );
        let c = cache.clone();
        rows.push(
            measure("cache-runtime Redis hit (for scale)", tasks, move |id| {
                let c = c.clone();
                async move {
                    black_box(ours(&c, id).await);
                }
            })
            .await,
        );
    }
    let counts = tiered.stats().total;
    assert!(counts.local_hits > counts.hits / 2, "the local rows were answered locally: {counts:?}");
    rows
}

/// The miss rows use a cache of their own with a 1 s command deadline: on a
/// loaded machine the default 50 ms is sometimes passed, the breaker opens,
/// and misses turn into bypasses that touch no Redis (printed after the
/// table, and by `BENCH_ONLY=miss64`). One per process: a call site keeps
/// its state (its run of misses among it) for the first cache it is used
/// with.
fn miss_cache(server: &support::RedisServer) -> Cache {
    Cache::builder()
        .url(server.url())
        .key_prefix("bench")
        .command_timeout(Duration::from_secs(1))
        .build()
        .expect("cache")
}

/// The raw client's miss of key `n`: a `GET` that finds nothing, the body,
/// a `SET PX` of its encoding.
async fn raw_miss(conn: &mut redis::aio::MultiplexedConnection, n: u64) {
    let key = format!("raw-miss:{n}");
    let hit: Option<Vec<u8>> = conn.get(&key).await.unwrap();
    assert!(hit.is_none());
    let product = Product::new(7);
    let bytes = bincode::serde::encode_to_vec(&product, bincode_config()).unwrap();
    let _: () = conn.pset_ex(&key, bytes, 3_600_000).await.unwrap();
    black_box(product);
}

/// Our miss, locked and not, against the raw `GET` + `SET PX` at `tasks`
/// tasks, in [`ROUNDS`] rounds of [`ROUND`] that rotate which goes first,
/// as [`alternating`] does for hits: per round, each of ours against the
/// raw pair run next to it, as a throughput ratio (64 tasks) and a p50
/// ratio (1 task). Keys are never reused, so every call misses.
async fn miss_rounds(server: &support::RedisServer, cache: &Cache, tasks: usize) -> [Vec<(f64, f64)>; 2] {
    let raw = redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    // One counter for every run of the rounds: keys are never reused.
    static NEXT: AtomicU64 = AtomicU64::new(1 << 50);
    let next = Arc::new(AtomicU64::new(NEXT.fetch_add(1 << 40, Relaxed)));
    let mut ratios = [Vec::with_capacity(ROUNDS), Vec::with_capacity(ROUNDS)];
    for round in 0..ROUNDS {
        let mut rows: Vec<(usize, Row)> = Vec::with_capacity(3);
        for turn in 0..3 {
            let which = (round + turn) % 3;
            let (c, n, conn) = (cache.clone(), next.clone(), raw.clone());
            let row = measure_for("miss", tasks, ROUND, move |_| {
                let (c, n, mut conn) = (c.clone(), n.clone(), conn.clone());
                async move {
                    let n = n.fetch_add(1, Relaxed);
                    match which {
                        0 => drop(black_box(ours_miss(&c, n).await)),
                        1 => drop(black_box(ours_miss_unlocked(&c, n).await)),
                        _ => raw_miss(&mut conn, n).await,
                    }
                }
            })
            .await;
            rows.push((which, row));
        }
        rows.sort_by_key(|(which, _)| *which);
        let raw = &rows[2].1;
        for (i, ours) in rows[..2].iter().enumerate() {
            let ours = &ours.1;
            ratios[i].push((ours.ops_per_sec() / raw.ops_per_sec(), ours.p50.as_secs_f64() / raw.p50.as_secs_f64()));
        }
    }
    ratios
}

/// The median of `values`.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut sorted: Vec<f64> = values.collect();
    sorted.sort_by(f64::total_cmp);
    (sorted[(sorted.len() - 1) / 2] + sorted[sorted.len() / 2]) / 2.0
}

/// One line per contender of [`miss_rounds`]: the median ratio the
/// targets speak of, and each round's.
fn print_miss_rounds(tasks: usize, ratios: &[Vec<(f64, f64)>; 2]) {
    for (name, rounds) in ["#[cached] miss", "#[cached(lock = false)] miss"].iter().zip(ratios) {
        // Throughput ratios at 64 tasks, p50 ratios at 1.
        let what = if tasks == 1 { "p50 ×" } else { "ops/s ×" };
        let pick = |r: &(f64, f64)| if tasks == 1 { r.1 } else { r.0 };
        let each: Vec<String> = rounds.iter().map(|r| format!("{:.2}", pick(r))).collect();
        println!(
            "{name}, {tasks} task(s), {ROUNDS} rotating rounds of {ROUND:?} against raw GET + SET PX: {what} median {:.2} \
             (rounds: {})",
            median(rounds.iter().map(pick)),
            each.join(" ")
        );
    }
}

async fn miss_path(server: &support::RedisServer, cache: &Cache) -> Vec<Row> {
    let mut raw = redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let next = Arc::new(AtomicU64::new(0));
    let mut rows = Vec::new();
    for tasks in [1, 64] {
        let (c, n) = (cache.clone(), next.clone());
        rows.push(
            measure("cache-runtime #[cached] miss", tasks, move |_| {
                let (c, n) = (c.clone(), n.clone());
                async move {
                    black_box(ours_miss(&c, n.fetch_add(1, Relaxed)).await);
                }
            })
            .await,
        );
        let (c, n) = (cache.clone(), next.clone());
        rows.push(
            measure("cache-runtime #[cached(lock = false)] miss", tasks, move |_| {
                let (c, n) = (c.clone(), n.clone());
                async move {
                    black_box(ours_miss_unlocked(&c, n.fetch_add(1, Relaxed)).await);
                }
            })
            .await,
        );
        let (conn, n) = (raw.clone(), next.clone());
        rows.push(
            measure("raw GET (nil) + SET PX", tasks, move |_| {
                let (mut conn, n) = (conn.clone(), n.clone());
                async move { raw_miss(&mut conn, n.fetch_add(1, Relaxed)).await }
            })
            .await,
        );
    }
    let _: () = redis::cmd("FLUSHDB").arg("ASYNC").query_async(&mut raw).await.unwrap();
    let total = cache.stats().total;
    if total.bypassed + total.timeouts + total.breaker_rejections > 0 {
        println!(
            "(miss rows: {} bypassed, {} timeouts, {} breaker rejections: Redis was too slow at times, those rows \
             are not a measure)",
            total.bypassed, total.timeouts, total.breaker_rejections
        );
    }
    rows
}

#[cached(ttl = 3600, prefix = "bench_stampede", skip(runs), cache = cache)]
async fn cold_report(cache: &Cache, runs: &AtomicUsize, round: u32) -> Result<String, BenchError> {
    runs.fetch_add(1, Relaxed);
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(format!("report {round}"))
}

async fn stampede(cache: &Cache) {
    let runs = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..1_000)
        .map(|_| {
            let (cache, runs) = (cache.clone(), runs.clone());
            tokio::spawn(async move {
                let t = Instant::now();
                cold_report(&cache, &runs, 1).await.unwrap();
                t.elapsed()
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.push(task.await.unwrap());
    }
    latencies.sort();
    println!(
        "\nStampede: 1,000 concurrent callers of one cold key, 50 ms body (more: cargo bench --bench stampede)\n\
         cache-runtime #[cached]: body ran {} time(s), p50 {:.1?}, p99 {:.1?}",
        runs.load(Relaxed),
        latencies[500],
        latencies[990]
    );
}

async fn breaker_open() {
    let mut server = support::RedisServer::start();
    let cache = Cache::builder().url(server.url()).key_prefix("bench").build().unwrap();
    server.kill();
    for id in 0..10 {
        ours(&cache, id).await;
    }
    const CALLS: u32 = 100_000;
    let t = Instant::now();
    for id in 0..CALLS {
        black_box(ours(&cache, id % KEYS).await);
    }
    let cached = t.elapsed() / CALLS;
    let t = Instant::now();
    for id in 0..CALLS {
        black_box(Product::new(id % KEYS));
    }
    let bare = t.elapsed() / CALLS;
    println!(
        "\nRedis stopped, breaker open: a call costs {cached:.2?}, the bare body {bare:.2?}: {:.2?} added per call \
         (target: under 50 µs); breaker rejections {}",
        cached.saturating_sub(bare),
        cache.stats().total.breaker_rejections
    );
}

fn key_and_codec_cpu() {
    const N: u32 = 1_000_000;
    let product = Product::new(42);
    let encoded = bincode::serde::encode_to_vec(&product, bincode_config()).unwrap();
    let t = Instant::now();
    for id in 0..N {
        let mut hasher = KeyHasher::new("bench::ours::__cache_identity", 1);
        hasher.part(b"Product");
        hasher.arg(&black_box(id)).unwrap();
        black_box(hasher.finish().to_hex());
    }
    let key = t.elapsed() / N;
    let t = Instant::now();
    for _ in 0..N {
        black_box(bincode::serde::encode_to_vec(black_box(&product), bincode_config()).unwrap());
    }
    let encode = t.elapsed() / N;
    let t = Instant::now();
    for _ in 0..N {
        let (p, _): (Product, usize) =
            bincode::serde::decode_from_slice(black_box(&encoded), bincode_config()).unwrap();
        black_box(p);
    }
    let decode = t.elapsed() / N;
    println!(
        "\nCPU per call, {}-byte value: key {key:.0?}, encode {encode:.0?}, decode {decode:.0?}; key + decode (a hit) \
         {:.0?} (target: under 1 µs)",
        encoded.len(),
        key + decode
    );
}

/// `BENCH_ONLY=ours64` runs only our 64-task hit path, for 10 s: for
/// profiling (`perf record -e cpu-clock -g`).
async fn profile_only(cache: &Cache) {
    for id in 0..KEYS {
        ours(cache, id).await;
    }
    let c = cache.clone();
    let row = measure_for("cache-runtime #[cached] hit", 64, Duration::from_secs(10), move |id| {
        let c = c.clone();
        async move {
            black_box(ours(&c, id).await);
        }
    })
    .await;
    println!("{} ops/s", row.ops_per_sec() as u64);
}

/// The server's command counts (`INFO commandstats`): `cmdstat_<name>`
/// and its `calls`.
fn command_counts(server: &support::RedisServer) -> Vec<(String, u64)> {
    let mut conn = server.conn();
    let info: String = redis::cmd("INFO").arg("commandstats").query(&mut conn).unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.strip_prefix("calls=")?.split(',').next()?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// `BENCH_ONLY=miss` prints the miss table alone, then what one miss sends:
/// commands per miss of each kind, from the server's `INFO commandstats`.
/// `BENCH_ONLY=miss64` / `miss1` run only our locked miss for 10 s at 64
/// or 1 task(s), for profiling; `miss64u` / `miss1u` the miss without the
/// lock.
fn miss_only(mode: &str) {
    let server = support::RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let cache = miss_cache(&server);
        if mode == "miss" {
            let rows = miss_path(&server, &cache).await;
            print_table(
                "Miss path, body returns at once (ratios against raw GET + SET)",
                &rows,
                "raw GET (nil) + SET PX",
            );
            for tasks in [1, 64] {
                print_miss_rounds(tasks, &miss_rounds(&server, &cache, tasks).await);
            }
            for (name, lock) in [("#[cached] miss", true), ("#[cached(lock = false)] miss", false)] {
                let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut server.conn()).expect("resetstat");
                const MISSES: u64 = 2_000;
                let start = 1u64 << 40;
                for n in start..start + MISSES {
                    if lock {
                        black_box(ours_miss(&cache, n).await);
                    } else {
                        black_box(ours_miss_unlocked(&cache, n).await);
                    }
                }
                let counts = command_counts(&server);
                let per_miss: Vec<String> = counts
                    .iter()
                    .filter(|(name, _)| name != "config")
                    .map(|(name, calls)| format!("{name} {:.2}", *calls as f64 / MISSES as f64))
                    .collect();
                println!("{name}, 1 task: commands per miss: {}", per_miss.join(", "));
            }
            return;
        }
        let tasks = if mode.starts_with("miss64") { 64 } else { 1 };
        let unlocked = mode.ends_with('u');
        let next = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let until = started + Duration::from_secs(10);
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let (c, n) = (cache.clone(), next.clone());
                tokio::spawn(async move {
                    while Instant::now() < until {
                        let n = n.fetch_add(1, Relaxed);
                        if unlocked {
                            black_box(ours_miss_unlocked(&c, n).await);
                        } else {
                            black_box(ours_miss(&c, n).await);
                        }
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.await.expect("bench task");
        }
        let total = cache.stats().total;
        println!("{:.0} misses/s; {total:?}", next.load(Relaxed) as f64 / started.elapsed().as_secs_f64(),);
    });
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Ok(mode) = std::env::var("BENCH_ONLY")
        && matches!(mode.as_str(), "miss" | "miss64" | "miss1" | "miss64u" | "miss1u")
    {
        miss_only(&mode);
        return;
    }
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "local1") {
        // One task on the local tier for 5 s: for `perf record`.
        let server = support::RedisServer::start();
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let tiered = Cache::builder().url(server.url()).key_prefix("prof").local(10_000).build().expect("cache");
            while tiered.stats().total.local_hits == 0 {
                ours_local(&tiered, 0).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let until = Instant::now() + Duration::from_secs(5);
            let mut calls = 0u64;
            while Instant::now() < until {
                for id in 0..100 {
                    black_box(ours_local(&tiered, (calls as u32 + id * 7) % KEYS).await);
                }
                calls += 100;
            }
            println!("{calls} calls, {:?}", tiered.stats().total);
        });
        return;
    }
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "local") {
        let server = support::RedisServer::start();
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let cache = Cache::builder().url(server.url()).key_prefix("bench").build().expect("cache");
            for id in 0..KEYS {
                ours(&cache, id).await;
            }
            let rows = local_path(&server, &cache).await;
            print_table("In-process hits (ratios against moka + bincode alone)", &rows, RAW_MOKA);
        });
        return;
    }
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "hit1") {
        // One task of Redis hits for 3 s: for `strace -c` and `perf stat`.
        let server = support::RedisServer::start();
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let cache = Cache::builder().url(server.url()).key_prefix("bench").build().expect("cache");
            for id in 0..KEYS {
                ours(&cache, id).await;
            }
            let row = measure("hit1", 1, move |id| {
                let c = cache.clone();
                async move {
                    black_box(ours(&c, id).await);
                }
            })
            .await;
            println!("{} ops, p50 {:?}", row.ops, row.p50);
        });
        return;
    }
    #[cfg(feature = "cluster")]
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "cluster") {
        let cluster = support::RedisCluster::start(3);
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        let rows = runtime.block_on(cluster_hit_path(&cluster));
        print_table("Redis Cluster hits (ratios against redis-rs's cluster connection)", &rows, RAW_CLUSTER);
        return;
    }
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "hit64") {
        // Ours against the `cached` crate at 64 tasks, alternating: for A/B
        // runs of two builds.
        let server = support::RedisServer::start();
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("CACHED_REDIS_CONNECTION_STRING", server.url()) };
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let cache = Cache::builder().url(server.url()).key_prefix("bench").build().expect("cache");
            for id in 0..KEYS {
                ours(&cache, id).await;
                let _ = theirs(id).await;
            }
            print_alternating(64, &alternating(&server, &cache, 64).await);
        });
        return;
    }
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "theirs64") {
        // The `cached` crate's 64-task hit path for 10 s: for profiling.
        let server = support::RedisServer::start();
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("CACHED_REDIS_CONNECTION_STRING", server.url()) };
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            for id in 0..KEYS {
                let _ = theirs(id).await;
            }
            let row = measure_for("theirs", 64, Duration::from_secs(10), |id| async move {
                black_box(theirs(id).await.unwrap_or_else(|BenchError(why)| panic!("cached crate failed: {why}")));
            })
            .await;
            println!("{} ops/s", row.ops_per_sec() as u64);
        });
        return;
    }
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "ours64") {
        let server = support::RedisServer::start();
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let cache = Cache::builder().url(server.url()).key_prefix("bench").build().expect("cache");
            for id in 0..KEYS {
                ours(&cache, id).await;
            }
            let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut server.conn()).expect("resetstat");
            let hits = cache.stats().total.hits;
            profile_only(&cache).await;
            let hits = cache.stats().total.hits - hits;
            // How many lookups one command carried: what the batcher achieved.
            for (name, calls) in command_counts(&server) {
                println!("{name}: {calls} calls, {:.1} hits per call", hits as f64 / calls.max(1) as f64);
            }
        });
        return;
    }
    let server = support::RedisServer::start();
    // The `cached` crate reads its Redis URL from the environment, once.
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("CACHED_REDIS_CONNECTION_STRING", server.url()) };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    println!(
        "cache-runtime benchmark: {} cores, {}, {}-byte value, {KEYS} pre-warmed keys, {RUN:?} per row",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        String::from_utf8_lossy(
            &std::process::Command::new("redis-server").arg("--version").output().map(|o| o.stdout).unwrap_or_default()
        )
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" "),
        bincode::serde::encode_to_vec(Product::new(1), bincode_config()).map(|v| v.len()).unwrap_or(0)
    );
    runtime.block_on(async {
        let cache = Cache::builder().url(server.url()).key_prefix("bench").build().expect("cache");
        let rows = hit_path(&server, &cache).await;
        print_table("Hit path (ratios against the raw multiplexed client at the same concurrency)", &rows, RAW_MUX);
        for tasks in [1, 64] {
            print_alternating(tasks, &alternating(&server, &cache, tasks).await);
        }
        let rows = local_path(&server, &cache).await;
        print_table("In-process hits (ratios against moka + bincode alone)", &rows, RAW_MOKA);
        let rows = miss_path(&server, &miss_cache(&server)).await;
        print_table("Miss path, body returns at once (ratios against raw GET + SET)", &rows, "raw GET (nil) + SET PX");
        stampede(&cache).await;
        breaker_open().await;
    });
    #[cfg(feature = "cluster")]
    {
        let cluster = support::RedisCluster::start(3);
        let rows = runtime.block_on(cluster_hit_path(&cluster));
        print_table("Redis Cluster hits (ratios against redis-rs's cluster connection)", &rows, RAW_CLUSTER);
    }
    key_and_codec_cpu();
}
