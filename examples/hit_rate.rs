//! A skewed workload and the report that tunes it: this cache's per-prefix
//! counters next to what Redis itself counted.
//!
//! ```text
//! cargo run --release --example hit_rate
//! REDIS_URL=redis://127.0.0.1:6380 cargo run --release --example hit_rate
//! ```
//!
//! Two functions: product pages (2,000 ids, 30 s TTL) and searches (500
//! queries, a 1 s TTL so entries expire during the run), each called with
//! Zipf-distributed ids (s = 1.1): a few are hot, most are rare, as in real
//! traffic.

use cache_runtime::{Cache, cached};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[cached(ttl = 30, prefix = "product_page", jitter = 0.1)]
async fn product_page(id: u32) -> String {
    tokio::time::sleep(Duration::from_millis(2)).await;
    format!("<h1>product {id}</h1>")
}

#[cached(ttl = 1, prefix = "search")]
async fn search(query: u32) -> Vec<u32> {
    tokio::time::sleep(Duration::from_millis(5)).await;
    (query..query + 10).collect()
}

/// Samples 0..n with P(k) proportional to 1 / (k + 1)^s.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=n)
            .map(|k| {
                total += 1.0 / (k as f64).powf(s);
                total
            })
            .collect::<Vec<_>>();
        Self { cumulative: cumulative.iter().map(|c| c / total).collect() }
    }

    fn sample(&self, rng: &mut impl Rng) -> u32 {
        let u: f64 = rng.random();
        self.cumulative.partition_point(|&c| c < u) as u32
    }
}

fn redis_stats(url: &str) -> Option<Vec<(String, u64)>> {
    let mut conn = redis::Client::open(url).ok()?.get_connection_with_timeout(Duration::from_secs(1)).ok()?;
    let info: String = redis::cmd("INFO").arg("stats").query(&mut conn).ok()?;
    let wanted = ["keyspace_hits", "keyspace_misses", "expired_keys", "evicted_keys"];
    Some(
        info.lines()
            .filter_map(|line| line.split_once(':'))
            .filter(|(name, _)| wanted.contains(name))
            .filter_map(|(name, value)| Some((name.to_owned(), value.trim().parse().ok()?)))
            .collect(),
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let cache = Cache::builder().url(&url).key_prefix("hit-rate-example").build()?;
    cache_runtime::init(cache.clone())?;
    for namespace in ["product_page", "search"] {
        // Start cold, so the report shows the warm-up too.
        let _ = cache.invalidate(namespace).await;
    }
    let before = redis_stats(&url);

    let (products, searches) = (Arc::new(Zipf::new(2_000, 1.1)), Arc::new(Zipf::new(500, 1.1)));
    const RUN_FOR: Duration = Duration::from_secs(3);
    let started = Instant::now();
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (products, searches) = (products.clone(), searches.clone());
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
                while started.elapsed() < RUN_FOR {
                    if rng.random_bool(0.7) {
                        product_page(products.sample(&mut rng)).await;
                    } else {
                        search(searches.sample(&mut rng)).await;
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await?;
    }
    let elapsed = started.elapsed();

    let stats = cache.stats();
    let calls = stats.total.hits + stats.total.misses + stats.total.coalesced + stats.total.bypassed;
    println!("{calls} calls from 16 tasks in {elapsed:.2?}\n");
    println!(
        "{:<14} {:>8} {:>8} {:>8} {:>10} {:>8} {:>9} {:>7} {:>12}",
        "prefix", "calls", "hits", "misses", "coalesced", "stale", "hit rate", "errors", "bytes read"
    );
    let rows = stats.prefixes.iter().map(|(name, c)| (name.as_str(), c)).chain([("total", &stats.total)]);
    for (name, c) in rows {
        println!(
            "{name:<14} {:>8} {:>8} {:>8} {:>10} {:>8} {:>8.1}% {:>7} {:>12}",
            c.hits + c.misses + c.coalesced + c.bypassed,
            c.hits,
            c.misses,
            c.coalesced,
            c.stale,
            c.hit_rate() * 100.0,
            c.errors(),
            c.bytes_read
        );
    }

    match (before, redis_stats(&url)) {
        (Some(before), Some(after)) => {
            println!("\nRedis INFO stats during the run (the whole server, all clients):");
            for ((name, a), (_, b)) in before.iter().zip(&after) {
                println!("  {name:<16} {:>8}", b - a);
            }
            println!(
                "Redis counts keys, not calls: each lookup reads the entry and its namespace version,\n\
                 so keyspace_hits includes version reads; expired_keys shows the 1 s search entries expiring."
            );
        }
        _ => println!("\nRedis at {url} is unreachable: every call computed ({} bypassed)", stats.total.bypassed),
    }
    Ok(())
}
