//! Write paths: invalidate a namespace, refresh or forget one entry, and
//! cache something dynamic with `get_or_compute`.
//!
//! ```text
//! cargo run --example invalidation
//! ```

use cache_runtime::{Cache, Policy, cached};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// A stand-in for the database.
static PRICES: Mutex<BTreeMap<u64, u32>> = Mutex::new(BTreeMap::new());

fn db_price(id: u64) -> Option<u32> {
    println!("  (database read for product {id})");
    PRICES.lock().ok()?.get(&id).copied()
}

fn db_write(id: u64, price: Option<u32>) {
    if let Ok(mut prices) = PRICES.lock() {
        match price {
            Some(price) => prices.insert(id, price),
            None => prices.remove(&id),
        };
    }
}

#[cached(ttl = 600, prefix = "product", tags("products"))]
async fn price(id: u64) -> Option<u32> {
    db_price(id)
}

#[cached(ttl = 600, prefix = "catalog", tags("products"))]
async fn catalog() -> Vec<u64> {
    println!("  (database scan)");
    PRICES.lock().map(|prices| prices.keys().copied().collect()).unwrap_or_default()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let cache = Cache::builder().url(&url).key_prefix("invalidation-example").build()?;
    cache_runtime::init(cache.clone())?;
    if let Err(e) = cache_runtime::invalidate("products").await {
        println!("Redis at {url} is unreachable ({e}); every call will compute");
    }
    db_write(1, Some(999));
    db_write(2, Some(1999));

    println!("price(1) = {:?}", price(1).await);
    println!("price(1) = {:?}   <- cached", price(1).await);
    println!("price(2) = {:?}", price(2).await);
    println!("catalog() = {:?}", catalog().await);

    println!("\nUPDATE product 1, then write-through:");
    db_write(1, Some(899));
    println!("refresh(price(1)) = {:?}", cache_runtime::refresh(price(1)).await);
    println!("price(1) = {:?}   <- cached, fresh", price(1).await);

    println!("\nDELETE product 2, then forget its entry:");
    db_write(2, None);
    println!("forget(price(2)) -> entry existed: {:?}", cache_runtime::forget(price(2)).await);
    println!("price(2) = {:?}", price(2).await);

    println!("\nINSERT product 3: every entry tagged \"products\" is stale now:");
    db_write(3, Some(4999));
    let version = cache_runtime::invalidate("products").await;
    println!("invalidate(\"products\") -> {version:?}");
    println!("catalog() = {:?}", catalog().await);

    println!("\nget_or_compute for a dynamic key:");
    let policy = Policy::new("price_range").ttl(Duration::from_secs(60)).tags(["products"]);
    for _ in 0..2 {
        let cheap: Result<Vec<u64>, std::convert::Infallible> = cache
            .get_or_compute(&policy, &(0u32, 1000u32), async {
                println!("  (database range scan)");
                Ok(PRICES
                    .lock()
                    .map(|p| p.iter().filter(|(_, v)| **v < 1000).map(|(k, _)| *k).collect())
                    .unwrap_or_default())
            })
            .await;
        println!("products under 10.00: {cheap:?}");
    }

    let stats = cache.stats().total;
    println!(
        "\nhits {} misses {} stale {} refreshes {} writes {}",
        stats.hits, stats.misses, stats.stale, stats.refreshes, stats.writes
    );
    Ok(())
}
