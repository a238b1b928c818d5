//! `#[cached]` against real Redis servers: the foundation's behaviour.

mod support;

use cache_runtime::{Cache, cached};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;
use support::{RedisServer, Topology, entry_keys, run};

const DEADLINE: Duration = Duration::from_secs(30);

fn cache_for(server: &Topology, key_prefix: &str) -> Cache {
    support::patient_cache(&server.url(), key_prefix).build().expect("valid cache settings")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    id: u64,
    name: String,
    price_cents: u32,
}

#[cached(ttl = 60, prefix = "products", skip(calls), cache = cache)]
async fn product(cache: &Cache, calls: &AtomicUsize, id: u64) -> Product {
    calls.fetch_add(1, SeqCst);
    Product { id, name: format!("product {id}"), price_cents: 100 * id as u32 }
}

fn miss_then_hit_runs_the_body_once(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(server, "app");
        let calls = AtomicUsize::new(0);
        let first = product(&cache, &calls, 7).await;
        let second = product(&cache, &calls, 7).await;
        assert_eq!(first, second);
        assert_eq!(first.name, "product 7");
        assert_eq!(calls.load(SeqCst), 1, "the second call must be a hit");
        product(&cache, &calls, 8).await;
        assert_eq!(calls.load(SeqCst), 2, "another argument is another entry");
        let stats = cache.stats().total;
        assert_eq!((stats.hits, stats.misses, stats.writes), (1, 2, 2));
    });
    let keys = entry_keys(&mut server.conn(), "app:products:*");
    assert_eq!(keys.len(), 2, "keys start with key_prefix:prefix: {keys:?}");
}

#[cached(ttl = 1, prefix = "short", skip(calls), cache = cache)]
async fn short_lived(cache: &Cache, calls: &AtomicUsize, id: u32) -> u32 {
    calls.fetch_add(1, SeqCst);
    id * 2
}

fn entries_expire_after_their_ttl(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(server, "app");
        let calls = AtomicUsize::new(0);
        assert_eq!(short_lived(&cache, &calls, 21).await, 42);
        assert_eq!(short_lived(&cache, &calls, 21).await, 42);
        assert_eq!(calls.load(SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(short_lived(&cache, &calls, 21).await, 42);
        assert_eq!(calls.load(SeqCst), 2, "an expired entry is computed again");
    });
}

#[cached(ttl = 100, prefix = "jittered", jitter = 0.2, cache = cache)]
async fn jittered(cache: &Cache, id: u32) -> u32 {
    id
}

fn jitter_spreads_ttls_within_bounds(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(server, "app");
        for id in 0..200 {
            jittered(&cache, id).await;
        }
    });
    let mut conn = server.conn();
    let keys = entry_keys(&mut conn, "app:jittered:*");
    assert_eq!(keys.len(), 200);
    let pttls: Vec<i64> = keys.iter().map(|k| redis::cmd("PTTL").arg(k).query(&mut conn).unwrap()).collect();
    // Stored within [80 s, 120 s]; a little time has passed since.
    let (lo, hi) = (80_000 - 30_000, 120_000);
    assert!(pttls.iter().all(|&t| t > lo && t <= hi), "PTTLs out of bounds: {pttls:?}");
    assert!(pttls.iter().any(|&t| t < 95_000) && pttls.iter().any(|&t| t > 105_000), "not spread: {pttls:?}");
    let distinct: std::collections::HashSet<_> = pttls.iter().collect();
    assert!(distinct.len() > 100, "TTLs must differ, got {} distinct", distinct.len());
}

#[cached(ttl = 60, prefix = "skipping", skip(calls, request_id), cache = cache)]
async fn skipping(cache: &Cache, calls: &AtomicUsize, request_id: u64, user: u32) -> String {
    calls.fetch_add(1, SeqCst);
    format!("user {user} (first seen in request {request_id})")
}

fn skipped_arguments_do_not_change_the_key(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(server, "app");
        let calls = AtomicUsize::new(0);
        let a = skipping(&cache, &calls, 1, 5).await;
        let b = skipping(&cache, &calls, 2, 5).await;
        assert_eq!(a, b, "request_id is skipped: same entry");
        assert_eq!(calls.load(SeqCst), 1);
        skipping(&cache, &calls, 1, 6).await;
        assert_eq!(calls.load(SeqCst), 2, "user is part of the key");
    });
}

#[derive(Serialize)]
struct Query {
    text: String,
    limit: u32,
}

struct User {
    id: u64,
    display_name: String,
}

#[cached(ttl = 60, prefix = "search", key = (user.id, &query))]
async fn search(cache: &Cache, calls: &AtomicUsize, user: &User, query: Query) -> Vec<String> {
    let _ = cache;
    calls.fetch_add(1, SeqCst);
    vec![format!("{} searched {} (limit {})", user.id, query.text, query.limit)]
}

#[cached(ttl = 60, prefix = "search2", key = (user.id, &query), cache = cache)]
async fn search_keyed(cache: &Cache, calls: &AtomicUsize, user: &User, query: Query) -> Vec<String> {
    calls.fetch_add(1, SeqCst);
    vec![format!("{} for {}", query.text, user.display_name)]
}

fn key_expression_replaces_the_arguments(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(server, "app");
        let calls = AtomicUsize::new(0);
        let alice = User { id: 1, display_name: "Alice".into() };
        let alice_renamed = User { id: 1, display_name: "Alice B.".into() };
        let bob = User { id: 2, display_name: "Bob".into() };
        let q = || Query { text: "shoes".into(), limit: 10 };
        let first = search_keyed(&cache, &calls, &alice, q()).await;
        let again = search_keyed(&cache, &calls, &alice_renamed, q()).await;
        assert_eq!(first, again, "display_name is not in the key");
        assert_eq!(calls.load(SeqCst), 1);
        search_keyed(&cache, &calls, &bob, q()).await;
        assert_eq!(calls.load(SeqCst), 2, "the principal is in the key");
        search_keyed(&cache, &calls, &alice, Query { text: "shoes".into(), limit: 20 }).await;
        assert_eq!(calls.load(SeqCst), 3, "the query is in the key");
        // Without `cache = ...` this one uses the process-wide cache, which
        // this test binary never initializes: it computes every time.
        search(&cache, &calls, &alice, q()).await;
        search(&cache, &calls, &alice, q()).await;
        assert_eq!(calls.load(SeqCst), 5);
    });
}

#[derive(Debug, PartialEq)]
struct DbError(String);

#[cached(ttl = 60, prefix = "fallible", skip(calls, fail), cache = cache)]
async fn fallible(cache: &Cache, calls: &AtomicUsize, fail: bool, id: u32) -> Result<u32, DbError> {
    calls.fetch_add(1, SeqCst);
    if fail {
        return Err(DbError(format!("db down for {id}")));
    }
    let doubled = u32::checked_mul(id, 2).ok_or_else(|| DbError("overflow".into()))?;
    Ok(doubled)
}

fn errors_are_returned_and_never_cached(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(server, "app");
        let calls = AtomicUsize::new(0);
        assert_eq!(fallible(&cache, &calls, true, 3).await, Err(DbError("db down for 3".into())));
        assert_eq!(fallible(&cache, &calls, true, 3).await, Err(DbError("db down for 3".into())));
        assert_eq!(calls.load(SeqCst), 2, "an Err is not stored");
        assert_eq!(fallible(&cache, &calls, false, 3).await, Ok(6));
        assert_eq!(fallible(&cache, &calls, true, 3).await, Ok(6), "now the Ok is cached");
        assert_eq!(calls.load(SeqCst), 3);
    });
    assert_eq!(entry_keys(&mut server.conn(), "app:fallible:*").len(), 1);
}

#[cached(ttl = 60, prefix = "lookup", skip(calls), cache = cache)]
async fn lookup(cache: &Cache, calls: &AtomicUsize, id: u32) -> Option<String> {
    calls.fetch_add(1, SeqCst);
    id.is_multiple_of(2).then(|| format!("even {id}"))
}

fn none_is_cached_as_a_negative_result(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(server, "app");
        let calls = AtomicUsize::new(0);
        assert_eq!(lookup(&cache, &calls, 1).await, None);
        assert_eq!(lookup(&cache, &calls, 1).await, None);
        assert_eq!(lookup(&cache, &calls, 2).await.as_deref(), Some("even 2"));
        assert_eq!(lookup(&cache, &calls, 2).await.as_deref(), Some("even 2"));
        assert_eq!(calls.load(SeqCst), 2);
    });
}

struct Repo {
    cache: Cache,
    calls: AtomicUsize,
    table: &'static str,
}

impl Repo {
    #[cached(ttl = 60, prefix = "repo", skip(self), cache = self.cache)]
    async fn row(&self, id: u32) -> String {
        self.calls.fetch_add(1, SeqCst);
        format!("{}#{id}", self.table)
    }

    #[cached(ttl = 60, prefix = "repo", key = (self.table, id), cache = self.cache)]
    async fn row_per_table(&self, id: u32) -> String {
        self.calls.fetch_add(1, SeqCst);
        format!("{}#{id}", self.table)
    }
}

fn methods_skip_or_key_self(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(server, "app");
        let users = Repo { cache: cache.clone(), calls: AtomicUsize::new(0), table: "users" };
        let orders = Repo { cache: cache.clone(), calls: AtomicUsize::new(0), table: "orders" };
        assert_eq!(users.row(1).await, "users#1");
        assert_eq!(users.row(1).await, "users#1");
        assert_eq!(users.calls.load(SeqCst), 1);
        // skip(self): the result is declared independent of self.
        assert_eq!(orders.row(1).await, "users#1");
        assert_eq!(orders.calls.load(SeqCst), 0);
        // key = (self.table, id): self's table is part of the key.
        assert_eq!(users.row_per_table(1).await, "users#1");
        assert_eq!(orders.row_per_table(1).await, "orders#1");
        assert_eq!(orders.row_per_table(1).await, "orders#1");
        assert_eq!((users.calls.load(SeqCst), orders.calls.load(SeqCst)), (2, 1));
    });
}

trait Pricing {
    async fn price(&self, cache: &Cache, sku: &str) -> u64;
}

struct Shop {
    calls: AtomicUsize,
}

impl Pricing for Shop {
    #[cached(ttl = 60, prefix = "pricing", skip(self, cache), cache = cache)]
    async fn price(&self, cache: &Cache, sku: &str) -> u64 {
        self.calls.fetch_add(1, SeqCst);
        sku.len() as u64 * 100
    }
}

struct OtherShop;

impl Pricing for OtherShop {
    #[cached(ttl = 60, prefix = "pricing", skip(self, cache), cache = cache)]
    async fn price(&self, cache: &Cache, sku: &str) -> u64 {
        sku.len() as u64 * 1000
    }
}

fn trait_impl_methods_are_cached_and_kept_apart(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(server, "app");
        let shop = Shop { calls: AtomicUsize::new(0) };
        assert_eq!(shop.price(&cache, "abc").await, 300);
        assert_eq!(shop.price(&cache, "abc").await, 300);
        assert_eq!(shop.calls.load(SeqCst), 1);
        // Same prefix, same method name, same arguments, other impl.
        assert_eq!(OtherShop.price(&cache, "abc").await, 3000);
    });
}

#[cached(ttl = 60, prefix = "generic", skip(calls), cache = cache)]
async fn describe<T: Serialize + Send + Sync + std::fmt::Debug>(
    cache: &Cache,
    calls: &AtomicUsize,
    value: T,
) -> String {
    calls.fetch_add(1, SeqCst);
    format!("{value:?} as {}", std::any::type_name::<T>())
}

fn generic_instantiations_get_their_own_entries(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(server, "app");
        let calls = AtomicUsize::new(0);
        assert_eq!(describe(&cache, &calls, 5u32).await, "5 as u32");
        assert_eq!(describe(&cache, &calls, 5u64).await, "5 as u64");
        assert_eq!(describe(&cache, &calls, 5u32).await, "5 as u32");
        assert_eq!(calls.load(SeqCst), 2);
    });
    assert_eq!(entry_keys(&mut server.conn(), "app:generic:*").len(), 2);
}

#[cached(ttl = 60, prefix = "shared", cache = cache)]
async fn double(cache: &Cache, n: u32) -> u32 {
    n * 2
}

#[cached(ttl = 60, prefix = "shared", cache = cache)]
async fn triple(cache: &Cache, n: u32) -> u32 {
    n * 3
}

fn functions_with_equal_arguments_never_share_entries(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(server, "app");
        for _ in 0..2 {
            assert_eq!(double(&cache, 10).await, 20);
            assert_eq!(triple(&cache, 10).await, 30);
        }
        assert_eq!(cache.stats().total.hits, 2);
    });
}

fn key_prefixes_keep_applications_apart(server: &Topology) {
    run(DEADLINE, async {
        let shop = cache_for(server, "shop");
        let admin = cache_for(server, "admin");
        let (shop_calls, admin_calls) = (AtomicUsize::new(0), AtomicUsize::new(0));
        product(&shop, &shop_calls, 1).await;
        product(&admin, &admin_calls, 1).await;
        product(&admin, &admin_calls, 1).await;
        assert_eq!((shop_calls.load(SeqCst), admin_calls.load(SeqCst)), (1, 1));
    });
    let mut conn = server.conn();
    assert_eq!(entry_keys(&mut conn, "shop:products:*").len(), 1);
    assert_eq!(entry_keys(&mut conn, "admin:products:*").len(), 1);
}

#[cached(ttl = 60, prefix = "readable", codec = "json", cache = cache)]
async fn readable(cache: &Cache, id: u64) -> Product {
    Product { id, name: "lamp".into(), price_cents: 1999 }
}

fn json_entries_are_readable_with_a_plain_get(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(server, "app");
        readable(&cache, 3).await;
        assert_eq!(readable(&cache, 3).await.name, "lamp");
        assert_eq!(cache.stats().total.hits, 1);
    });
    let mut conn = server.conn();
    let keys = entry_keys(&mut conn, "app:readable:*");
    assert_eq!(keys.len(), 1);
    let raw: String = redis::cmd("GET").arg(&keys[0]).query(&mut conn).unwrap();
    let json = raw.rsplit_once('|').map(|(_, json)| json).unwrap_or_default();
    let parsed: serde_json::Value = serde_json::from_str(json).expect("the payload is JSON");
    assert_eq!(parsed, serde_json::json!({"id": 3, "name": "lamp", "price_cents": 1999}));
    assert!(raw.starts_with("RC2|j|"), "{raw}");
}

#[cached(ttl = 60, prefix = "concurrent", cache = cache)]
async fn square(cache: &Cache, n: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(5)).await;
    n * n
}

fn a_hundred_concurrent_callers_get_the_right_values(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(server, "app");
        let mut tasks = Vec::new();
        for i in 0..100u64 {
            let cache = cache.clone();
            tasks.push(tokio::spawn(async move {
                let n = i % 10;
                (n, square(&cache, n).await)
            }));
        }
        for task in tasks {
            let (n, squared) = task.await.expect("task did not panic");
            assert_eq!(squared, n * n);
        }
        let stats = cache.stats().total;
        assert_eq!(stats.hits + stats.misses + stats.coalesced, 100, "{stats:?}");
        assert_eq!(stats.misses, 10, "one computation per key: {stats:?}");
    });
}

#[test]
fn a_stopped_redis_costs_nothing_but_the_cache() {
    let mut server = RedisServer::start();
    let cache = Cache::builder()
        .url(server.url())
        .key_prefix("app")
        .command_timeout(Duration::from_millis(100))
        .connect_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let calls = AtomicUsize::new(0);
    run(DEADLINE, async {
        assert_eq!(product(&cache, &calls, 1).await.id, 1);
    });
    server.kill();
    run(DEADLINE, async {
        for i in 0..50 {
            let started = std::time::Instant::now();
            assert_eq!(product(&cache, &calls, i).await.price_cents, 100 * i as u32);
            assert!(started.elapsed() < Duration::from_millis(500), "call {i} stalled: {:?}", started.elapsed());
        }
    });
    assert_eq!(calls.load(SeqCst), 51, "every call computed");
    let stats = cache.stats().total;
    assert_eq!(stats.bypassed, 50);
    assert!(stats.connection_errors >= 1 && stats.breaker_rejections >= 1, "{stats:?}");
    assert!(cache.stats().total.errors() >= 50);
}

#[cached(ttl = 60, prefix = "big", skip(calls), cache = cache)]
async fn big_report(cache: &Cache, calls: &AtomicUsize, rows: usize) -> Vec<u64> {
    calls.fetch_add(1, SeqCst);
    (0..rows as u64).collect()
}

fn oversized_values_are_returned_but_not_stored(server: &Topology) {
    run(DEADLINE, async {
        let cache = support::patient_cache(&server.url(), "app").max_value_bytes(1024).build().unwrap();
        let calls = AtomicUsize::new(0);
        assert_eq!(big_report(&cache, &calls, 5_000).await.len(), 5_000);
        assert_eq!(big_report(&cache, &calls, 5_000).await.len(), 5_000);
        assert_eq!(calls.load(SeqCst), 2, "too large to store: computed each time");
        assert_eq!(big_report(&cache, &calls, 10).await.len(), 10);
        assert_eq!(big_report(&cache, &calls, 10).await.len(), 10);
        assert_eq!(calls.load(SeqCst), 3, "small values are still cached");
        assert_eq!(cache.stats().total.oversize, 2);
    });
    assert_eq!(entry_keys(&mut server.conn(), "app:big:*").len(), 1);
}

#[cached(ttl = 60, prefix = "shared_entry", cache = cache)]
async fn as_bincode(cache: &Cache, id: u64) -> Product {
    Product { id, name: "from bincode".into(), price_cents: 1 }
}

#[cached(ttl = 60, prefix = "shared_entry", codec = "json", cache = cache)]
async fn as_json(cache: &Cache, id: u64) -> Product {
    Product { id, name: "from json".into(), price_cents: 2 }
}

fn an_entry_written_by_another_codec_is_a_miss_that_is_overwritten(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(server, "app");
        as_bincode(&cache, 1).await;
        // Point the JSON function at the bincode entry, as a codec change
        // in a deploy would.
        let mut admin = server.conn();
        let keys = entry_keys(&mut admin, "app:shared_entry:*");
        assert_eq!(keys.len(), 1);
        as_json(&cache, 1).await;
        let json_key = entry_keys(&mut admin, "app:shared_entry:*").into_iter().find(|k| *k != keys[0]).unwrap();
        let bincode_entry: Vec<u8> = redis::cmd("GET").arg(&keys[0]).query(&mut admin).unwrap();
        let _: () = redis::cmd("SET").arg(&json_key).arg(bincode_entry).query(&mut admin).unwrap();

        assert_eq!(as_json(&cache, 1).await.name, "from json", "never a wrong value");
        assert_eq!(cache.stats().total.decode_errors, 1);
        assert_eq!(as_json(&cache, 1).await.name, "from json");
        assert_eq!(cache.stats().total.decode_errors, 1, "the foreign entry was overwritten");
    });
}

struct Table<T> {
    cache: Cache,
    _rows: std::marker::PhantomData<T>,
}

impl<T: Default + Serialize + serde::de::DeserializeOwned + Send + Sync> Table<T> {
    #[cached(ttl = 60, prefix = "tables", skip(self), cache = self.cache)]
    async fn describe(&self, id: u32) -> String {
        format!("{id} as {}", std::any::type_name::<T>())
    }
}

fn methods_of_generic_impls_keep_their_instantiations_apart(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(server, "app");
        let small = Table::<u8> { cache: cache.clone(), _rows: std::marker::PhantomData };
        let large = Table::<u64> { cache: cache.clone(), _rows: std::marker::PhantomData };
        assert_eq!(small.describe(1).await, "1 as u8");
        assert_eq!(large.describe(1).await, "1 as u64", "Table<u64> must not get Table<u8>'s entry");
        assert_eq!(small.describe(1).await, "1 as u8");
        assert_eq!(large.describe(1).await, "1 as u64");
        assert_eq!(cache.stats().total.hits, 2);
    });
    assert_eq!(entry_keys(&mut server.conn(), "app:tables:*").len(), 2);
}

on_every_topology!(
    miss_then_hit_runs_the_body_once,
    entries_expire_after_their_ttl,
    jitter_spreads_ttls_within_bounds,
    skipped_arguments_do_not_change_the_key,
    key_expression_replaces_the_arguments,
    errors_are_returned_and_never_cached,
    none_is_cached_as_a_negative_result,
    methods_skip_or_key_self,
    trait_impl_methods_are_cached_and_kept_apart,
    generic_instantiations_get_their_own_entries,
    functions_with_equal_arguments_never_share_entries,
    key_prefixes_keep_applications_apart,
    json_entries_are_readable_with_a_plain_get,
    a_hundred_concurrent_callers_get_the_right_values,
    oversized_values_are_returned_but_not_stored,
    an_entry_written_by_another_codec_is_a_miss_that_is_overwritten,
    methods_of_generic_impls_keep_their_instantiations_apart,
);
