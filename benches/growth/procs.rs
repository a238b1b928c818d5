//! Processes sharing one Redis: 1, 2, 4 copies of this benchmark's binary,
//! re-executed as workers (`GROW_WORKER=<mode>`), each running
//! `GROW_PROC_TASKS` (64) tasks for one row's time from a common start;
//! their throughputs are summed. Hits read 1,000 entries the parent warmed;
//! invalidations bump one namespace's version while every worker listens
//! on the channel (ours through its local tier, the raw workers through a
//! subscription of their own), so each invalidation is fanned out to all.

use crate::harness::{
    Pair, Product, Row, bincode_config, builder, measure, print_pairs, raw_connection, redis_cpu_time, run_time,
    setting,
};
use cache_runtime::{Cache, cached};
use redis::AsyncCommands;
use std::hint::black_box;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const KEYS: u32 = 1_000;
const RAW_CHANNEL: &str = "grow:raw-invalidations";

#[cached(ttl = 3600, prefix = "grow_proc", cache = cache)]
async fn shared(cache: &Cache, id: u32) -> Product {
    Product::new(id)
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The entries every worker hits, ours and raw.
pub async fn warm(url: &str) {
    let cache = builder(url).build().expect("cache");
    let mut conn = raw_connection(url).await;
    let bytes = bincode::serde::encode_to_vec(Product::new(7), bincode_config()).expect("encode");
    for id in 0..KEYS {
        shared(&cache, id).await;
        let _: () = conn.set(format!("raw-proc:{id}"), &bytes).await.expect("SET");
    }
}

/// A worker process: waits for `GROW_START_AT` (Unix ms), runs its mode
/// for one row's time, prints one `result` line for the parent.
pub fn worker(mode: &str) {
    let url: String = setting("GROW_URL", String::new());
    let tasks: usize = setting("GROW_PROC_TASKS", 64);
    let start_at: u64 = setting("GROW_START_AT", 0);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let (row, misses) = runtime.block_on(async {
        let client = redis::Client::open(url.as_str()).expect("client");
        let conn = raw_connection(&url).await;
        // Only the invalidating workers keep a local tier: it is what listens.
        let cache = if mode == "ours-invalidate" { builder(&url).local(1_000) } else { builder(&url) };
        let cache = cache.build().expect("cache");
        if mode == "raw-invalidate" {
            let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
            pubsub.subscribe(RAW_CHANNEL).await.expect("SUBSCRIBE");
            tokio::spawn(async move {
                use futures_util::StreamExt;
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    black_box(message);
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(start_at.saturating_sub(unix_ms()))).await;
        let row = match mode {
            "ours-hits" => {
                let c = cache.clone();
                measure(tasks, u64::MAX, move |n| {
                    let c = c.clone();
                    async move {
                        black_box(shared(&c, (n % u64::from(KEYS)) as u32).await);
                    }
                })
                .await
            }
            "raw-hits" => {
                measure(tasks, u64::MAX, move |n| {
                    let mut c = conn.clone();
                    async move {
                        let bytes: Vec<u8> = c.get(format!("raw-proc:{}", n % u64::from(KEYS))).await.expect("GET");
                        black_box(
                            bincode::serde::decode_from_slice::<Product, _>(&bytes, bincode_config()).expect("x"),
                        );
                    }
                })
                .await
            }
            "ours-invalidate" => {
                let c = cache.clone();
                measure(tasks, u64::MAX, move |_| {
                    let c = c.clone();
                    async move {
                        // A failure is counted by the cache, and reported.
                        let _ = black_box(c.invalidate("grow_inval").await);
                    }
                })
                .await
            }
            _ => {
                measure(tasks, u64::MAX, move |_| {
                    let mut c = conn.clone();
                    async move {
                        let (version, _): (u64, u64) = redis::pipe()
                            .incr("grow:raw-inval#v", 1)
                            .publish(RAW_CHANNEL, "n|grow_inval")
                            .query_async(&mut c)
                            .await
                            .expect("INCR + PUBLISH");
                        black_box(version);
                    }
                })
                .await
            }
        };
        let counts = cache.stats().total;
        (row, counts.misses + counts.errors())
    });
    println!(
        "result {} {} {} {} {} {}",
        row.ops,
        row.elapsed.as_micros(),
        row.p50.as_nanos(),
        row.p99.as_nanos(),
        row.client_cpu.as_nanos(),
        misses
    );
}

/// Runs `count` workers of `mode` from a common start, for `run`; their
/// rows summed (p50: the mean of theirs; p99: the worst).
fn run_workers(url: &str, mode: &str, count: usize, run: Duration) -> Row {
    let exe = std::env::current_exe().expect("this benchmark's path");
    let start_at = unix_ms() + 300 + 100 * count as u64;
    let children: Vec<_> = (0..count)
        .map(|_| {
            Command::new(&exe)
                .env("GROW_WORKER", mode)
                .env("GROW_URL", url)
                .env("GROW_START_AT", start_at.to_string())
                .env("GROW_RUN_MS", run.as_millis().to_string())
                .stdout(Stdio::piped())
                .spawn()
                .expect("worker process")
        })
        .collect();
    let redis_cpu = redis_cpu_time();
    let mut total = Row {
        ops: 0,
        elapsed: Duration::ZERO,
        p50: Duration::ZERO,
        p99: Duration::ZERO,
        client_cpu: Duration::ZERO,
        redis_cpu: Duration::ZERO,
    };
    for child in children {
        let output = child.wait_with_output().expect("worker output");
        let text = String::from_utf8_lossy(&output.stdout);
        let fields: Vec<u64> = text
            .lines()
            .find_map(|l| l.strip_prefix("result "))
            .map(|l| l.split(' ').filter_map(|f| f.parse().ok()).collect())
            .unwrap_or_default();
        let [ops, elapsed_us, p50, p99, client_cpu, misses] = fields[..] else {
            panic!("worker {mode} failed: {text}");
        };
        if mode.starts_with("ours") && misses > 0 {
            println!("(a worker of {mode} counted {misses} misses and errors)");
        }
        total.ops += ops;
        total.elapsed = total.elapsed.max(Duration::from_micros(elapsed_us));
        total.p50 += Duration::from_nanos(p50) / count as u32;
        total.p99 = total.p99.max(Duration::from_nanos(p99));
        total.client_cpu += Duration::from_nanos(client_cpu);
    }
    // Redis over the whole span, the workers' start-up wait included (an
    // idle Redis spends a few milliseconds a second).
    total.redis_cpu = redis_cpu_time() - redis_cpu;
    // Throughputs add up: all ran over the same span of wall time.
    total.elapsed = total.elapsed.max(run);
    total
}

/// Ours and raw workers in the order ours, raw, raw, ours, each for half a
/// row's time (as `harness::pair` does in one process).
fn pair_workers(url: &str, mode: &str, count: usize) -> (Row, Row) {
    let half = run_time() / 2;
    let ours1 = run_workers(url, &format!("ours-{mode}"), count, half);
    let raw1 = run_workers(url, &format!("raw-{mode}"), count, half);
    let raw2 = run_workers(url, &format!("raw-{mode}"), count, half);
    let ours2 = run_workers(url, &format!("ours-{mode}"), count, half);
    (ours1.joined(ours2), raw1.joined(raw2))
}

pub fn processes(url: &str) {
    let text: String = setting("GROW_PROCS", "1,2,4".to_owned());
    let tasks: usize = setting("GROW_PROC_TASKS", 64);
    let (mut hits, mut invalidations) = (Vec::new(), Vec::new());
    for count in text.split(',').filter_map(|t| t.trim().parse::<usize>().ok()) {
        let (ours, raw) = pair_workers(url, "hits", count);
        hits.push(Pair { what: format!("{count} processes"), tasks, ours, raw });
        let (ours, raw) = pair_workers(url, "invalidate", count);
        invalidations.push(Pair { what: format!("{count} processes"), tasks, ours, raw });
    }
    print_pairs(
        "Processes sharing one Redis, hits, throughput summed (raw: GET + decode); tasks per process",
        "workers",
        &hits,
    );
    print_pairs(
        "Processes sharing one Redis, invalidations, all subscribed (raw: INCR + PUBLISH pipelined)",
        "workers",
        &invalidations,
    );
}
