//! The same `#[cached]` code on a Redis Cluster: only the builder changes.
//!
//! ```text
//! REDIS_CLUSTER_NODES=redis://127.0.0.1:7000,redis://127.0.0.1:7001 \
//!     cargo run --example cluster --features cluster
//! ```
//!
//! A namespace lives in one slot (its `{prefix}` hash tag), so an entry, its
//! stampede lock and its version are on one node; a tag's version lives on
//! whichever node serves the tag's slot, and invalidating it still reaches
//! every entry it names.

use cache_runtime::{Cache, cached};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static QUERIES: AtomicUsize = AtomicUsize::new(0);

/// Pretend this is an expensive query over products and their stock.
#[cached(ttl = 300, prefix = "product_page", tags("products", "stock"), jitter = 0.1)]
async fn product_page(id: u64) -> String {
    QUERIES.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    format!("product {id}: 3 in stock")
}

async fn show(what: &str, id: u64) {
    let started = Instant::now();
    let page = product_page(id).await;
    println!("{what:<28} {:>9.2?}  {page}", started.elapsed());
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Ok(nodes) = std::env::var("REDIS_CLUSTER_NODES") else {
        println!("set REDIS_CLUSTER_NODES to some of your cluster's node URLs, separated by commas");
        return Ok(());
    };
    let cache = Cache::builder().cluster(nodes.split(',')).key_prefix("example").build()?;
    cache_runtime::init(cache.clone())?;
    // Start from a cold entry, so the first call below is a miss.
    cache_runtime::invalidate("product_page").await?;

    show("first call (miss)", 1).await;
    show("second call (hit)", 1).await;
    cache_runtime::invalidate("stock").await?;
    show("after invalidate(\"stock\")", 1).await;
    show("again (hit)", 1).await;

    let stats = cache.stats().total;
    println!(
        "queries run: {}   hits: {}   misses: {}   Redis errors: {}",
        QUERIES.load(Ordering::Relaxed),
        stats.hits,
        stats.misses,
        stats.errors()
    );
    Ok(())
}
