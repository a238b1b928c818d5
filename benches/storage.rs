//! What an entry costs Redis, and what compression changes about it:
//! for 100,000 entries of a 2 KB product list and of 100-byte rows, with
//! no compression, lz4 and (feature `zstd`) zstd, each against its own
//! fresh redis-server: `INFO memory` bytes per entry, the stored size and
//! the compression ratio, hit p50 (one task) and throughput (64 tasks).
//! Then the threshold sweep: payloads from 64 bytes to 4 KiB, stored raw
//! and lz4, side by side, to find below which size compression stops
//! paying. And where an entry's bytes go: key, header, payload, Redis's
//! own overhead.
//!
//! ```text
//! cargo bench --bench storage --features zstd
//! ```

#[path = "common/product.rs"]
mod product;
#[path = "../tests/support/mod.rs"]
mod support;
use product::Product as Row;

use cache_runtime::{Cache, Compression, Policy};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

const ENTRIES: u32 = 100_000;
/// Entries the hit rows read: warm, spread over the whole set.
const HIT_KEYS: u32 = 1_000;
const RUN: Duration = Duration::from_secs(1);
const FILL_TASKS: u32 = 64;

/// One product of a listing page: text fields as an API returns them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Item {
    id: u32,
    sku: String,
    name: String,
    brand: String,
    category: String,
    summary: String,
    price: String,
    image: String,
    rating: f32,
}

const ADJECTIVES: [&str; 8] =
    ["Stainless", "Insulated", "Compact", "Foldable", "Classic", "Ultralight", "Rugged", "Eco"];
const NOUNS: [&str; 8] =
    ["water bottle", "backpack", "headlamp", "camping chair", "tent", "rain jacket", "mug", "stove"];
const BRANDS: [&str; 5] = ["Northwind", "Alpenglow", "Trailhead Co.", "Summit Works", "Riverstone"];

/// A listing page: 12 products, about 2 KB in bincode.
fn listing(page: u32) -> Vec<Item> {
    (0..12)
        .map(|i| {
            let id = page * 12 + i;
            let h = id.wrapping_mul(2_654_435_761);
            let (adjective, noun) = (ADJECTIVES[(h % 8) as usize], NOUNS[(h / 8 % 8) as usize]);
            Item {
                id,
                sku: format!("SKU-{id:08}"),
                name: format!("{adjective} {noun} {}", h % 900 + 100),
                brand: BRANDS[(h / 64 % 5) as usize].to_owned(),
                category: format!("outdoor/{}", noun.replace(' ', "-")),
                summary: format!("{adjective} {noun} for everyday trips; ships in {} days.", h % 5 + 1),
                price: format!("{}.{:02} EUR", h % 200 + 5, h % 100),
                image: format!("https://cdn.example.com/img/{id:08}/{}.jpg", h % 4096),
                rating: (h % 50) as f32 / 10.0,
            }
        })
        .collect()
}

struct Measured {
    name: String,
    bytes_per_entry: f64,
    stored: f64,
    p50: Duration,
    ops_per_sec: f64,
}

fn used_memory(server: &support::RedisServer) -> f64 {
    let info: String = redis::cmd("INFO").arg("memory").query(&mut server.conn()).expect("INFO");
    let field = info.lines().find_map(|l| l.strip_prefix("used_memory:")).expect("used_memory");
    field.trim().parse().expect("a number")
}

/// Entry keys, and the average `STRLEN` of the entries of a sample.
fn sample(server: &support::RedisServer, pattern: &str) -> (Vec<String>, f64) {
    let mut conn = server.conn();
    let keys = support::entry_keys(&mut conn, pattern);
    let sample = &keys[..keys.len().min(1000)];
    let total: usize = sample.iter().map(|k| redis::cmd("STRLEN").arg(k).query::<usize>(&mut conn).unwrap()).sum();
    (keys.clone(), total as f64 / sample.len() as f64)
}

/// Fills `count` entries through `fetch` (misses), from 64 tasks.
async fn fill<F, Fut>(count: u32, fetch: F)
where
    F: Fn(u32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let fetch = Arc::new(fetch);
    let per_task = count.div_ceil(FILL_TASKS);
    let tasks: Vec<_> = (0..FILL_TASKS)
        .map(|t| {
            let fetch = fetch.clone();
            tokio::spawn(async move {
                for id in t * per_task..((t + 1) * per_task).min(count) {
                    fetch(id).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("fill task");
    }
}

/// p50 of one task's hits, and the hit rate of `tasks` tasks, over `keys`
/// ids `stride` apart.
async fn hits<F, Fut>(keys: u32, stride: u32, tasks: usize, fetch: F) -> (Duration, f64)
where
    F: Fn(u32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let fetch = Arc::new(fetch);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (fetch, stop) = (fetch.clone(), stop.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(100_000);
                let mut id = (t as u32 * 7919) % keys;
                while !stop.load(Relaxed) {
                    id = (id * 21 + 13) % keys;
                    let t0 = Instant::now();
                    fetch(id * stride).await;
                    latencies.push(t0.elapsed());
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(RUN).await;
    stop.store(true, Relaxed);
    let mut latencies = Vec::new();
    for handle in handles {
        latencies.extend(handle.await.expect("hit task"));
    }
    let rate = latencies.len() as f64 / started.elapsed().as_secs_f64();
    latencies.sort();
    (latencies[latencies.len() / 2], rate)
}

fn cache(server: &support::RedisServer, compression: Compression, threshold: usize) -> Cache {
    Cache::builder()
        .url(server.url())
        .key_prefix("s")
        .pool_size(16)
        .command_timeout(Duration::from_secs(2))
        .compression(compression)
        .compress_threshold(threshold)
        .build()
        .expect("cache")
}

/// Rounds of hit measurements, each configuration in turn, so that what
/// else the machine does falls on all of them alike; medians are reported.
const ROUNDS: usize = 5;

/// 100,000 entries of one shape under each compression, each on its own
/// fresh server; then their hits, interleaved.
async fn shape<T, M>(name: &str, make: M) -> Vec<Measured>
where
    T: Serialize + serde::de::DeserializeOwned + Send + 'static,
    M: Fn(u32) -> T + Send + Sync + Copy + 'static,
{
    let fetch = move |cache: Cache| {
        let policy = Arc::new(Policy::new("v").ttl(Duration::from_secs(3600)));
        move |id: u32| {
            let (cache, policy) = (cache.clone(), policy.clone());
            async move {
                let value = cache.get_or_compute(&policy, &id, async move { Ok::<_, String>(make(id)) }).await;
                std::hint::black_box(value.expect("computed"));
            }
        }
    };
    let mut filled = Vec::new();
    for compression in compressions() {
        let server = support::RedisServer::start();
        let cache = cache(&server, compression, 0);
        let before = used_memory(&server);
        fill(ENTRIES, fetch(cache.clone())).await;
        let bytes_per_entry = (used_memory(&server) - before) / f64::from(ENTRIES);
        let (keys, stored) = sample(&server, "s:v:*");
        assert_eq!(keys.len(), ENTRIES as usize, "every entry stored");
        filled.push((server, cache, compression, bytes_per_entry, stored, Vec::new(), Vec::new()));
    }
    for _ in 0..ROUNDS {
        for (_, cache, _, _, _, p50s, rates) in &mut filled {
            p50s.push(hits(HIT_KEYS, ENTRIES / HIT_KEYS, 1, fetch(cache.clone())).await.0);
            rates.push(hits(HIT_KEYS, ENTRIES / HIT_KEYS, 64, fetch(cache.clone())).await.1);
        }
    }
    filled
        .into_iter()
        .map(|(_server, cache, compression, bytes_per_entry, stored, mut p50s, mut rates)| {
            assert!(cache.stats().total.decode_errors == 0 && cache.stats().total.hits > 0);
            p50s.sort();
            rates.sort_by(f64::total_cmp);
            let name = format!("{name} / {}", compression.name());
            Measured { name, bytes_per_entry, stored, p50: p50s[ROUNDS / 2], ops_per_sec: rates[ROUNDS / 2] }
        })
        .collect()
}

fn compressions() -> Vec<Compression> {
    #[allow(unused_mut)]
    let mut all = vec![Compression::None, Compression::Lz4];
    #[cfg(feature = "zstd")]
    all.push(Compression::Zstd);
    all
}

fn print_shapes(rows: &[Measured]) {
    println!(
        "\n{:<28} {:>12} {:>10} {:>7} {:>9} {:>11} {:>8}",
        "100,000 entries", "INFO B/entry", "STRLEN", "ratio", "hit p50", "64-task/s", "ops ×"
    );
    for row in rows {
        let shape = row.name.split(" / ").next().unwrap_or_default();
        let base = rows.iter().find(|r| r.name == format!("{shape} / none")).unwrap_or(row);
        println!(
            "{:<28} {:>12.0} {:>10.0} {:>7.2} {:>9.1?} {:>11.0} {:>8.2}",
            row.name,
            row.bytes_per_entry,
            row.stored,
            base.stored / row.stored,
            row.p50,
            row.ops_per_sec,
            row.ops_per_sec / base.ops_per_sec
        );
    }
}

/// Payloads of each size, raw and lz4 side by side on one server: the
/// memory each saves and the hit time each costs.
async fn threshold_sweep() {
    const PER_SIZE: u32 = 10_000;
    println!(
        "\n{:<10} {:>14} {:>14} {:>8} {:>12} {:>12} {:>8}",
        "payload", "raw B/entry", "lz4 B/entry", "saved", "raw hit p50", "lz4 hit p50", "p50 ×"
    );
    for size in [64usize, 128, 256, 512, 1024, 2048, 4096] {
        let mut filled = Vec::new();
        for compression in [Compression::None, Compression::Lz4] {
            let server = support::RedisServer::start();
            let cache = cache(&server, compression, 0);
            let policy = Arc::new(Policy::new("t").ttl(Duration::from_secs(3600)));
            let fetch = {
                let (cache, policy) = (cache.clone(), policy.clone());
                move |id: u32| {
                    let (cache, policy) = (cache.clone(), policy.clone());
                    async move {
                        // Text of the listing's kind, cut to `size` bytes.
                        let text = move || {
                            let mut text = String::new();
                            let mut page = id;
                            while text.len() < size {
                                text += &serde_json::to_string(&listing(page)).expect("json");
                                page += PER_SIZE;
                            }
                            text.truncate(size.saturating_sub(2));
                            text
                        };
                        let value = cache.get_or_compute(&policy, &id, async move { Ok::<_, String>(text()) }).await;
                        std::hint::black_box(value.expect("computed"));
                    }
                }
            };
            let before = used_memory(&server);
            fill(PER_SIZE, fetch.clone()).await;
            let per_entry = (used_memory(&server) - before) / f64::from(PER_SIZE);
            filled.push((server, fetch, per_entry, Vec::new()));
        }
        for _ in 0..ROUNDS {
            for (_, fetch, _, p50s) in &mut filled {
                p50s.push(hits(1000, PER_SIZE / 1000, 1, fetch.clone()).await.0);
            }
        }
        let mut measured = filled.into_iter().map(|(_server, _, per_entry, mut p50s)| {
            p50s.sort();
            (per_entry, p50s[ROUNDS / 2])
        });
        let (Some((raw, raw_p50)), Some((lz4, lz4_p50))) = (measured.next(), measured.next()) else { return };
        println!(
            "{:<10} {:>14.0} {:>14.0} {:>7.0}% {:>12.1?} {:>12.1?} {:>8.2}",
            format!("{size} B"),
            raw,
            lz4,
            100.0 * (raw - lz4) / raw,
            raw_p50,
            lz4_p50,
            lz4_p50.as_secs_f64() / raw_p50.as_secs_f64()
        );
    }
}

/// Where one entry's bytes go, uncompressed: the key, the header, the
/// payload, and what Redis adds (`MEMORY USAGE` and the `INFO` delta).
async fn overhead() {
    println!(
        "\n{:<12} {:>5} {:>7} {:>8} {:>13} {:>13} {:>16}",
        "entry", "key", "header", "payload", "MEMORY USAGE", "INFO B/entry", "Redis's own"
    );
    for (name, big) in [("100 B row", false), ("2 KB list", true)] {
        let server = support::RedisServer::start();
        let cache = cache(&server, Compression::None, usize::MAX);
        let policy = Arc::new(Policy::new("o").ttl(Duration::from_secs(3600)));
        let before = used_memory(&server);
        fill(ENTRIES, move |id| {
            let (cache, policy) = (cache.clone(), policy.clone());
            async move {
                if big {
                    let value = cache.get_or_compute(&policy, &id, async move { Ok::<_, String>(listing(id)) }).await;
                    std::hint::black_box(value.expect("computed"));
                } else {
                    let value = cache.get_or_compute(&policy, &id, async move { Ok::<_, String>(Row::new(id)) }).await;
                    std::hint::black_box(value.expect("computed"));
                }
            }
        })
        .await;
        let per_entry = (used_memory(&server) - before) / f64::from(ENTRIES);
        let mut conn = server.conn();
        let keys = support::entry_keys(&mut conn, "s:o:*");
        let (mut key, mut header, mut payload, mut usage) = (0usize, 0usize, 0usize, 0usize);
        for k in &keys[..1000] {
            let entry: Vec<u8> = redis::cmd("GET").arg(k).query(&mut conn).expect("GET");
            let end = entry.iter().enumerate().filter(|(_, b)| **b == b'|').nth(3).map_or(0, |(i, _)| i + 1);
            key += k.len();
            header += end;
            payload += entry.len() - end;
            usage += redis::cmd("MEMORY").arg("USAGE").arg(k).query::<usize>(&mut conn).expect("MEMORY USAGE");
        }
        let avg = |n: usize| n as f64 / 1000.0;
        let own = per_entry - avg(key) - avg(header) - avg(payload);
        println!(
            "{:<12} {:>5.0} {:>7.0} {:>8.0} {:>13.0} {:>13.0} {:>16.0}",
            name,
            avg(key),
            avg(header),
            avg(payload),
            avg(usage),
            per_entry,
            own
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        if only.is_empty() || only == "shapes" {
            let mut rows = shape("2 KB product list", listing).await;
            rows.extend(shape("100 B row", Row::new).await);
            print_shapes(&rows);
        }
        if only.is_empty() || only == "threshold" {
            threshold_sweep().await;
        }
        if only.is_empty() || only == "overhead" {
            overhead().await;
        }
    });
}
