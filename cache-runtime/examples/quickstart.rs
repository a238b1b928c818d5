//! Quickstart: a slow function, cached in Redis with one attribute.
//!
//! ```text
//! cargo run -p cache-runtime --example quickstart
//! REDIS_URL=redis://127.0.0.1:6380 cargo run -p cache-runtime --example quickstart
//! ```
//!
//! It lives in cache-runtime, not with the other examples in the root
//! package, so that it builds with the runtime alone: `-p cache-runtime`
//! keeps the root package's dev-dependencies (axum, sqlx, reqwest, ...) and
//! the features they enable out of the build.
//!
//! Runs with or without Redis: when it is unreachable the example says so
//! and caches in memory instead (`Cache::builder().build()` with no URL).

use cache_runtime::{Cache, cached};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Product {
    id: u64,
    name: String,
    price_cents: u32,
}

#[derive(Debug)]
struct DbError;

static QUERIES: AtomicUsize = AtomicUsize::new(0);

/// Pretend this is an expensive database query.
#[cached(ttl = 300, prefix = "products", jitter = 0.1)]
async fn list_products(page: u32) -> Result<Vec<Product>, DbError> {
    QUERIES.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok((0..3)
        .map(|i| {
            let id = u64::from(page) * 10 + i;
            Product { id, name: format!("product {id}"), price_cents: 999 + id as u32 }
        })
        .collect())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let redis = Cache::builder().url(&url).key_prefix("quickstart").pool_size(4).build()?;
    // Start from a cold cache so the first call below is a miss.
    let cache = match redis.invalidate("products").await {
        Ok(_) => {
            println!("Redis at {url}: caching");
            redis
        }
        Err(e) => {
            println!("Redis at {url} is unreachable ({e}): caching in this process only");
            Cache::builder().key_prefix("quickstart").build()?
        }
    };
    cache_runtime::init(cache.clone())?;

    for attempt in ["first call", "second call"] {
        let started = Instant::now();
        let products = list_products(1).await.map_err(|e| format!("{e:?}"))?;
        println!("{attempt:<12} {:>8.2?}  {} products, first: {}", started.elapsed(), products.len(), products[0].name);
    }

    let stats = cache.stats().total;
    println!(
        "queries run: {}   hits: {} ({} in process)   misses: {}   bypassed: {}",
        QUERIES.load(Ordering::Relaxed),
        stats.hits,
        stats.local_hits,
        stats.misses,
        stats.bypassed
    );
    Ok(())
}
