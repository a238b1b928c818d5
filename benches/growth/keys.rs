//! How a hit's cost grows with the entry's tags and with the keys Redis
//! holds, as ours against the raw client reading the same bytes.

use crate::cost::flush;
use crate::harness::{
    Pair, Product, bincode_config, builder, measure, pair, print_pairs, print_pairs_as, report_errors, setting,
    task_counts,
};
use cache_runtime::{Cache, cached};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use std::hint::black_box;

fn decode_product(bytes: &[u8]) -> Product {
    bincode::serde::decode_from_slice(bytes, bincode_config()).expect("decode").0
}

#[cached(ttl = 3600, prefix = "grow_tags0", cache = cache)]
async fn tags0(cache: &Cache, id: u32) -> Product {
    Product::new(id)
}

#[cached(ttl = 3600, prefix = "grow_tags1", tags("t1"), cache = cache)]
async fn tags1(cache: &Cache, id: u32) -> Product {
    Product::new(id)
}

#[cached(ttl = 3600, prefix = "grow_tags4", tags("t1", "t2", "t3", "t4"), cache = cache)]
async fn tags4(cache: &Cache, id: u32) -> Product {
    Product::new(id)
}

#[cached(ttl = 3600, prefix = "grow_tags8", tags("t1", "t2", "t3", "t4", "t5", "t6", "t7", "t8"), cache = cache)]
async fn tags8(cache: &Cache, id: u32) -> Product {
    Product::new(id)
}

const HIT_KEYS: u32 = 1_000;

/// A hit of `tags` tags through its function.
async fn tagged(cache: &Cache, tags: usize, id: u32) -> Product {
    match tags {
        0 => tags0(cache, id).await,
        1 => tags1(cache, id).await,
        4 => tags4(cache, id).await,
        _ => tags8(cache, id).await,
    }
}

/// Tags per entry: ours against a raw `GET` of the entry, and against a
/// raw `MGET` of the entry and one version key per namespace (what a
/// hand-written tagged cache reads).
pub async fn tags(url: &str, raw: &MultiplexedConnection) {
    let cache = builder(url).build().expect("cache");
    let mut conn = raw.clone();
    let bytes = bincode::serde::encode_to_vec(Product::new(7), bincode_config()).expect("encode");
    for id in 0..HIT_KEYS {
        for n in [0, 1, 4, 8] {
            tagged(&cache, n, id).await;
        }
        let _: () = conn.set(format!("raw-tag:{id}"), &bytes).await.expect("SET");
    }
    for t in 0..=8 {
        let _: () = conn.set(format!("raw-tag-version:{t}"), 1).await.expect("SET");
    }
    let (mut against_get, mut against_mget) = (Vec::new(), Vec::new());
    for tasks in task_counts() {
        for tags in [0, 1, 4, 8] {
            let c = raw.clone();
            let get = move |n| {
                let mut c = c.clone();
                async move {
                    let bytes: Vec<u8> = c.get(format!("raw-tag:{}", n % u64::from(HIT_KEYS))).await.expect("GET");
                    black_box(decode_product(&bytes));
                }
            };
            let c = cache.clone();
            let ours = move |n| {
                let c = c.clone();
                async move {
                    black_box(tagged(&c, tags, (n % u64::from(HIT_KEYS)) as u32).await);
                }
            };
            let (ours, get) = pair(tasks, u64::MAX, ours, get).await;
            let c = raw.clone();
            let mget = measure(tasks, u64::MAX, move |n| {
                let mut c = c.clone();
                async move {
                    let mut keys = vec![format!("raw-tag:{}", n % u64::from(HIT_KEYS))];
                    keys.extend((0..=tags).map(|t| format!("raw-tag-version:{t}")));
                    let mut values: Vec<Option<Vec<u8>>> = c.mget(&keys).await.expect("MGET");
                    let bytes = values.swap_remove(0).expect("entry");
                    black_box(values);
                    black_box(decode_product(&bytes));
                }
            })
            .await;
            against_get.push(Pair { what: format!("{tags} tags"), tasks, ours, raw: get });
            against_mget.push(Pair { what: format!("{tags} tags"), tasks, ours, raw: mget });
        }
    }
    report_errors("tags", &cache);
    print_pairs("Tags per entry, hits (raw: GET + decode of the same 75 bytes)", "entry", &against_get);
    print_pairs_as(
        "Tags per entry, hits (raw: MGET of the entry and 1 + tags version keys, + decode)",
        "entry",
        ("ours", "mget"),
        &against_mget,
    );
    flush(&mut conn).await;
}

#[cached(ttl = 3600, prefix = "grow_keys", cache = cache)]
async fn keyed(cache: &Cache, id: u32) -> Product {
    Product::new(id)
}

/// Keys already in Redis: `DEBUG POPULATE` fills the server with 100-byte
/// strings, and both sides hit the same 1,000 warm keys; a third row reads
/// the filled keys themselves, spread over all of them (no decode).
pub async fn keyspace(url: &str, raw: &MultiplexedConnection) {
    let cache = builder(url).build().expect("cache");
    let mut conn = raw.clone();
    let bytes = bincode::serde::encode_to_vec(Product::new(7), bincode_config()).expect("encode");
    for id in 0..HIT_KEYS {
        keyed(&cache, id).await;
        let _: () = conn.set(format!("raw-keys:{id}"), &bytes).await.expect("SET");
    }
    let text: String = setting("GROW_KEYSPACE", "1,100,10000,1000000".to_owned());
    let (mut pairs, mut spread) = (Vec::new(), Vec::new());
    // Filling a million keys takes longer than the default response timeout.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let client = redis::Client::open(url).expect("client");
    let mut slow = client.get_multiplexed_async_connection_with_config(&config).await.expect("connection");
    for filled in text.split(',').filter_map(|t| t.trim().parse::<u64>().ok()) {
        let _: () = redis::cmd("DEBUG")
            .arg("POPULATE")
            .arg(filled)
            .arg("fill")
            .arg(100)
            .query_async(&mut slow)
            .await
            .expect("DEBUG POPULATE (the server runs with --enable-debug-command yes)");
        let dbsize: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.expect("DBSIZE");
        for tasks in task_counts() {
            let c = cache.clone();
            let ours = move |n| {
                let c = c.clone();
                async move {
                    black_box(keyed(&c, (n % u64::from(HIT_KEYS)) as u32).await);
                }
            };
            let c = raw.clone();
            let raw_hit = move |n| {
                let mut c = c.clone();
                async move {
                    let bytes: Vec<u8> = c.get(format!("raw-keys:{}", n % u64::from(HIT_KEYS))).await.expect("GET");
                    black_box(decode_product(&bytes));
                }
            };
            let (ours, raw_hit) = pair(tasks, u64::MAX, ours, raw_hit).await;
            let c = raw.clone();
            let filled_get = measure(tasks, u64::MAX, move |n| {
                let mut c = c.clone();
                async move {
                    // Spread over the filled keys (a multiplicative hash of n).
                    let key = format!("fill:{}", n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % filled);
                    let bytes: Vec<u8> = c.get(key).await.expect("GET");
                    black_box(bytes);
                }
            })
            .await;
            let what = format!("{filled} ({dbsize})");
            pairs.push(Pair { what: what.clone(), tasks, ours, raw: raw_hit });
            spread.push(Pair { what, tasks, ours: filled_get, raw: raw_hit });
        }
    }
    report_errors("keys in Redis", &cache);
    print_pairs(
        "Keys in Redis, hits on 1,000 warm keys (raw: GET + decode); filled keys (DBSIZE, with both working sets)",
        "filled (DBSIZE)",
        &pairs,
    );
    print_pairs_as(
        "Keys in Redis: raw GET spread over all filled keys, against raw GET + decode of 1,000 warm ones",
        "filled (DBSIZE)",
        ("spread", "warm"),
        &spread,
    );
    flush(&mut conn).await;
}
