//! The local tier, refresh-ahead and stale-if-error, on one Redis.
//!
//! ```text
//! cargo run --release --example tiers
//! REDIS_URL=redis://127.0.0.1:6380 cargo run --release --example tiers
//! ```
//!
//! Prints what a hit costs from Redis and from the local tier, keeps a
//! 2-second key hot through refresh-ahead, then "takes the database down"
//! and shows stale copies served until an invalidation.

use cache_runtime::{Cache, cached};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Stands in for a database pool: cheap to clone, shared state inside.
#[derive(Clone, Default)]
struct Db {
    down: Arc<AtomicBool>,
    queries: Arc<AtomicUsize>,
}

impl Db {
    async fn rate(&self, currency: &str) -> Result<f64, String> {
        self.queries.fetch_add(1, Relaxed);
        tokio::time::sleep(Duration::from_millis(30)).await;
        if self.down.load(Relaxed) { Err(format!("database down, no rate for {currency}")) } else { Ok(1.08) }
    }
}

#[cached(ttl = 60, prefix = "rates_remote", skip(db))]
async fn rate_from_redis(db: Db, currency: String) -> Result<f64, String> {
    db.rate(&currency).await
}

#[cached(ttl = 60, prefix = "rates_local", local_ttl = 10, skip(db))]
async fn rate_local(db: Db, currency: String) -> Result<f64, String> {
    db.rate(&currency).await
}

#[cached(ttl = 2, prefix = "rates_hot", refresh_ahead = 0.5, stale_if_error = 600, skip(db))]
async fn rate_hot(db: Db, currency: String) -> Result<f64, String> {
    db.rate(&currency).await
}

/// The median time of `calls` calls.
async fn median<F: Future>(calls: usize, call: impl Fn() -> F) -> Duration {
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        call().await;
        times.push(started.elapsed());
    }
    times.sort();
    times[calls / 2]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let cache = Cache::builder().url(&url).key_prefix("tiers_example").local(10_000).build()?;
    cache_runtime::init(cache.clone())?;
    for namespace in ["rates_remote", "rates_local", "rates_hot"] {
        if let Err(e) = cache.invalidate(namespace).await {
            println!("Redis at {url} is unreachable ({e}); start one, or set REDIS_URL");
            return Ok(());
        }
    }
    let db = Db::default();
    let eur = || "EUR".to_owned();

    rate_from_redis(db.clone(), eur()).await?;
    let remote = median(2_000, || rate_from_redis(db.clone(), eur())).await;
    // The local tier trusts itself once its invalidation channel is live.
    while cache.stats().total.local_hits == 0 {
        rate_local(db.clone(), eur()).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let local = median(2_000, || rate_local(db.clone(), eur())).await;
    println!("hit from Redis: {remote:>9.1?}   hit from the local tier: {local:>7.1?}");

    let before = db.queries.load(Relaxed);
    let until = Instant::now() + Duration::from_secs(5);
    let mut slowest = Duration::ZERO;
    while Instant::now() < until {
        let started = Instant::now();
        rate_hot(db.clone(), eur()).await?;
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let hot = cache.stats().prefix("rates_hot").copied().unwrap_or_default();
    println!(
        "5 s of calls on a 2 s TTL: {} miss, {} renewals in the background, {} queries, slowest call {slowest:.1?}",
        hot.misses,
        hot.renewals,
        db.queries.load(Relaxed) - before
    );

    db.down.store(true, Relaxed);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    println!("database down, entry past its TTL: {:?}", rate_hot(db.clone(), eur()).await);
    cache_runtime::invalidate("rates_hot").await?;
    println!("after invalidate(\"rates_hot\"):       {:?}", rate_hot(db.clone(), eur()).await);
    let stats = cache.stats().total;
    println!("stale copies served: {}   local hits: {}", stats.stale_served, stats.local_hits);
    Ok(())
}
