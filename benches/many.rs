//! A page of 100 ids with 90 already cached, side by side in one run
//! against one private redis-server: a bulk call (`#[cached(batch(ids))]`)
//! against (a) a loop of 100 single `#[cached]` calls and (b) the raw
//! client: `MGET` of the 100 keys, the body for the 10 missing, and a
//! pipeline of `SET ... PX` for them. Each page brings 10 ids never seen
//! before, so every page has exactly 10 misses.
//!
//! Round trips are counted by the server: `total_reads_processed` (one per
//! read of a client's socket, which a pipeline sends in one write) and
//! `total_commands_processed`, per page, over pages run one at a time.
//!
//! ```text
//! cargo bench --bench many
//! ```

#[path = "common/product.rs"]
mod product;
#[path = "../tests/support/mod.rs"]
mod support;
use product::Product;

use cache_runtime::{Cache, cached};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::time::{Duration, Instant};

const PAGE: u32 = 100;
const CACHED: u32 = 90;
const RUN: Duration = Duration::from_secs(2);
const TTL_MS: u64 = 3_600_000;

/// The database: one query for any number of ids.
fn load(ids: &[u32]) -> HashMap<u32, Product> {
    ids.iter().map(|&id| (id, Product::new(id))).collect()
}

#[cached(ttl = 3600, prefix = "page", batch(ids), cache = cache)]
async fn ours(cache: &Cache, ids: Vec<u32>) -> HashMap<u32, Product> {
    load(&ids)
}

#[cached(ttl = 3600, prefix = "single", cache = cache)]
async fn single(cache: &Cache, id: u32) -> Option<Product> {
    load(&[id]).remove(&id)
}

/// (a): the page as a loop of single cached calls.
async fn single_loop(cache: &Cache, ids: Vec<u32>) -> HashMap<u32, Product> {
    let mut page = HashMap::with_capacity(ids.len());
    for id in ids {
        if let Some(product) = single(cache, id).await {
            page.insert(id, product);
        }
    }
    page
}

/// (b): the raw client, by hand.
async fn raw(conn: &mut redis::aio::MultiplexedConnection, ids: Vec<u32>) -> HashMap<u32, Product> {
    let config = bincode::config::standard();
    let keys: Vec<String> = ids.iter().map(|id| format!("raw:{id}")).collect();
    let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(&keys).query_async(conn).await.expect("MGET");
    let mut page = HashMap::with_capacity(ids.len());
    let mut missing = Vec::new();
    for (id, value) in ids.into_iter().zip(values) {
        match value.and_then(|bytes| bincode::serde::decode_from_slice::<Product, _>(&bytes, config).ok()) {
            Some((product, _)) => {
                page.insert(id, product);
            }
            None => missing.push(id),
        }
    }
    if !missing.is_empty() {
        let found = load(&missing);
        let mut pipe = redis::pipe();
        for (id, product) in &found {
            let bytes = bincode::serde::encode_to_vec(product, config).expect("encode");
            pipe.cmd("SET").arg(format!("raw:{id}")).arg(bytes).arg("PX").arg(TTL_MS).ignore();
        }
        let () = pipe.query_async(conn).await.expect("pipeline");
        page.extend(found);
    }
    page
}

/// A page: the 90 cached ids, then 10 never asked for before; with
/// `fresh` at `u32::MAX`, the first 100 ids, all cached.
fn page(fresh: &AtomicU32) -> Vec<u32> {
    if fresh.load(Relaxed) == u32::MAX {
        return (0..PAGE).collect();
    }
    let first = fresh.fetch_add(PAGE - CACHED, Relaxed);
    (0..CACHED).chain(first..first + (PAGE - CACHED)).collect()
}

struct Row {
    name: &'static str,
    pages: u64,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    reads: f64,
    commands: f64,
}

impl Row {
    fn pages_per_sec(&self) -> f64 {
        self.pages as f64 / self.elapsed.as_secs_f64()
    }
}

/// The server's counters of socket reads and commands.
fn server_counts(server: &support::RedisServer) -> (u64, u64) {
    let info: String = redis::cmd("INFO").arg("stats").query(&mut server.conn()).expect("INFO");
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("INFO stats has no {name}"))
    };
    (field("total_reads_processed"), field("total_commands_processed"))
}

/// Pages one at a time for `RUN` (latency, and the server's counts per
/// page), then from `tasks` concurrent tasks (throughput).
async fn measure<F, Fut>(server: &support::RedisServer, name: &'static str, tasks: usize, call: F) -> Row
where
    F: Fn(Vec<u32>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HashMap<u32, Product>> + Send,
{
    let all_cached = name.contains("all cached");
    let call = Arc::new(call);
    let fresh = Arc::new(AtomicU32::new(if all_cached { u32::MAX } else { 1_000_000 }));
    let before = server_counts(server);
    let mut latencies = Vec::new();
    let until = Instant::now() + RUN;
    while Instant::now() < until {
        let ids = page(&fresh);
        let t0 = Instant::now();
        let found = call(ids).await;
        latencies.push(t0.elapsed());
        assert_eq!(found.len(), PAGE as usize, "{name}: a page lost an id");
    }
    let after = server_counts(server);
    // The two INFO calls are one read and one command each.
    let per_page = |a: u64, b: u64| (b - a).saturating_sub(1) as f64 / latencies.len() as f64;
    let (reads, commands) = (per_page(before.0, after.0), per_page(before.1, after.1));
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    let (p50, p99) = (at(0.5), at(0.99));

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (call, stop, fresh) = (call.clone(), stop.clone(), fresh.clone());
            tokio::spawn(async move {
                let mut pages = 0u64;
                while !stop.load(Relaxed) {
                    black_box(call(page(&fresh)).await);
                    pages += 1;
                }
                pages
            })
        })
        .collect();
    tokio::time::sleep(RUN).await;
    stop.store(true, Relaxed);
    let mut pages = 0;
    for handle in handles {
        pages += handle.await.expect("bench task");
    }
    Row { name, pages, elapsed: started.elapsed(), p50, p99, reads, commands }
}

fn print_table(rows: &[Row], tasks: usize) {
    println!(
        "\nA page of {PAGE} ids, {CACHED} cached: latency one page at a time, throughput from {tasks} tasks; \
         round trips and commands per page as the server counted them"
    );
    println!("{:<40} {:>9} {:>9} {:>9} {:>11} {:>9} {:>7}", "", "p50", "p99", "pages/s", "round trips", "commands", "");
    for row in rows {
        println!(
            "{:<40} {:>9.1?} {:>9.1?} {:>9.0} {:>11.1} {:>9.1}",
            row.name,
            row.p50,
            row.p99,
            row.pages_per_sec(),
            row.reads,
            row.commands
        );
    }
    let (ours, looped, raw, ours_hits, raw_hits) = (&rows[0], &rows[1], &rows[2], &rows[3], &rows[4]);
    println!(
        "\nbatch vs (a) the loop: {:.1}x fewer round trips, {:.1}x the throughput, p50 {:.1}x faster",
        looped.reads / ours.reads,
        ours.pages_per_sec() / looped.pages_per_sec(),
        looped.p50.as_secs_f64() / ours.p50.as_secs_f64()
    );
    println!(
        "batch vs (b) the raw client: p50 {:.2}x its latency, {:.2}x its throughput, {:.1} vs {:.1} round trips",
        ours.p50.as_secs_f64() / raw.p50.as_secs_f64(),
        ours.pages_per_sec() / raw.pages_per_sec(),
        ours.reads,
        raw.reads
    );
    println!(
        "all {PAGE} cached, batch vs the raw client's MGET: p50 {:.2}x its latency, {:.2}x its throughput",
        ours_hits.p50.as_secs_f64() / raw_hits.p50.as_secs_f64(),
        ours_hits.pages_per_sec() / raw_hits.pages_per_sec()
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let server = support::RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let cache = Cache::builder().url(server.url()).key_prefix("bench").build().expect("cache");
        let client = redis::Client::open(server.url()).expect("url");
        let conn = client.get_multiplexed_async_connection().await.expect("raw connection");
        // The 90 cached ids, for each contender.
        let hot: Vec<u32> = (0..CACHED).collect();
        ours(&cache, hot.clone()).await;
        single_loop(&cache, hot.clone()).await;
        raw(&mut conn.clone(), hot).await;
        if let Ok(only @ ("ours1" | "hits1")) = std::env::var("BENCH_ONLY").as_deref() {
            // One task of pages for 5 s, for `perf record`: pages with 10
            // misses (`ours1`), or every id cached (`hits1`); then the
            // server's time per command.
            let fresh = AtomicU32::new(if only == "hits1" { u32::MAX } else { 1_000_000 });
            ours(&cache, (0..PAGE).collect()).await;
            let until = Instant::now() + Duration::from_secs(5);
            let mut pages = 0u64;
            while Instant::now() < until {
                black_box(ours(&cache, page(&fresh)).await);
                pages += 1;
            }
            println!("{pages} pages");
            let info: String = redis::cmd("INFO").arg("commandstats").query(&mut server.conn()).unwrap_or_default();
            for line in info.lines().filter(|l| l.starts_with("cmdstat_")) {
                println!("{line}");
            }
            return;
        }
        let tasks = 4;
        let ours_row = {
            let cache = cache.clone();
            measure(&server, "ours: #[cached(batch(ids))]", tasks, move |ids| {
                let cache = cache.clone();
                async move { ours(&cache, ids).await }
            })
            .await
        };
        let loop_row = {
            let cache = cache.clone();
            measure(&server, "(a) loop of 100 single #[cached] calls", tasks, move |ids| {
                let cache = cache.clone();
                async move { single_loop(&cache, ids).await }
            })
            .await
        };
        let raw_row = {
            let conn = conn.clone();
            measure(&server, "(b) raw MGET + body + SET PX pipeline", tasks, move |ids| {
                let mut conn = conn.clone();
                async move { raw(&mut conn, ids).await }
            })
            .await
        };
        // The read path alone: every id of the page cached.
        ours(&cache, (0..PAGE).collect()).await;
        raw(&mut conn.clone(), (0..PAGE).collect()).await;
        let ours_hits = {
            let cache = cache.clone();
            measure(&server, "ours, all cached", tasks, move |ids| {
                let cache = cache.clone();
                async move { ours(&cache, ids).await }
            })
            .await
        };
        let raw_hits = measure(&server, "(b) raw MGET, all cached", tasks, move |ids| {
            let mut conn = conn.clone();
            async move { raw(&mut conn, ids).await }
        })
        .await;
        print_table(&[ours_row, loop_row, raw_row, ours_hits, raw_hits], tasks);
    });
}
