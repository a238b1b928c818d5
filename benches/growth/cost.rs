//! How a hit's and a miss's cost grow with the value's size, as ours
//! against the raw client doing the same work: a `GET` and a bincode decode
//! of the same bytes (a hit), a `GET` of nothing then an encode and `SET
//! PX` (a miss); and where the time goes.

use crate::harness::{
    Pair, Product, bincode_config, builder, measure_for, pair, print_pairs, report_errors, run_time, setting,
    task_counts,
};
use cache_runtime::{Cache, cached};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

/// A page of rows, padded to an exact encoded size: values grow because
/// lists grow, and decoding a list of rows is what a user's value costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page {
    rows: Vec<Product>,
    pad: String,
}

fn encoded_len(page: &Page) -> usize {
    bincode::serde::encode_to_vec(page, bincode_config()).map_or(0, |b| b.len())
}

/// A page of `bytes` encoded bytes (of rows of 75, the rest padding).
pub fn page(bytes: usize) -> Page {
    let mut page = Page { rows: Vec::new(), pad: String::new() };
    while encoded_len(&page) + 80 < bytes {
        page.rows.push(Product::new(page.rows.len() as u32));
    }
    while encoded_len(&page) < bytes {
        page.pad.push('.');
    }
    page
}

fn decode_page(bytes: &[u8]) -> Page {
    bincode::serde::decode_from_slice(bytes, bincode_config()).expect("decode").0
}

#[cached(ttl = 3600, prefix = "grow_size", skip(value), cache = cache)]
async fn ours_sized(cache: &Cache, value: &Page, size: usize, id: u64) -> Page {
    value.clone()
}

pub async fn flush(conn: &mut MultiplexedConnection) {
    let _: () = redis::cmd("FLUSHDB").query_async(conn).await.expect("FLUSHDB");
}

fn sizes() -> Vec<usize> {
    let text: String = setting("GROW_SIZES", "100,10000,100000,1000000".to_owned());
    text.split(',').filter_map(|t| t.trim().parse().ok()).filter(|&b| b > 0).collect()
}

/// Value size: hits over a working set of at most 64 MB, misses bounded
/// to `GROW_MISS_MB` (128) written per side of a row, then the codec and the bytes
/// alone, to tell where the time goes.
pub async fn value_size(url: &str, raw: &MultiplexedConnection) {
    let cache = builder(url).max_value_bytes(4 << 20).build().expect("cache");
    let memory = Cache::builder().key_prefix("grow_mem").max_value_bytes(4 << 20).build().expect("memory cache");
    let miss_budget: usize = setting::<usize>("GROW_MISS_MB", 128) << 20;
    let (mut hits, mut misses, mut why) = (Vec::new(), Vec::new(), Vec::new());
    for size in sizes() {
        let value = Arc::new(page(size));
        let bytes = Arc::new(bincode::serde::encode_to_vec(&*value, bincode_config()).expect("encode"));
        let keys = ((64 << 20) / size).clamp(8, 1_000) as u64;
        let mut conn = raw.clone();
        flush(&mut conn).await;
        for id in 0..keys {
            ours_sized(&cache, &value, size, id).await;
            let _: () = conn.set(format!("raw-size:{id}"), &*bytes).await.expect("SET");
        }
        for tasks in task_counts() {
            let (c, v, rc) = (cache.clone(), value.clone(), raw.clone());
            let ours = move |n| {
                let (c, v) = (c.clone(), v.clone());
                async move {
                    black_box(ours_sized(&c, &v, size, n % keys).await);
                }
            };
            let raw_hit = move |n| {
                let mut conn = rc.clone();
                async move {
                    let bytes: Vec<u8> = conn.get(format!("raw-size:{}", n % keys)).await.expect("GET");
                    black_box(decode_page(&bytes));
                }
            };
            let (ours, raw_hit) = pair(tasks, u64::MAX, ours, raw_hit).await;
            hits.push(Pair { what: format!("{size} B"), tasks, ours, raw: raw_hit });
        }
        let max_ops = (miss_budget / size).max(100) as u64;
        for tasks in task_counts() {
            let (c, v) = (cache.clone(), value.clone());
            let ours = move |n| {
                let (c, v) = (c.clone(), v.clone());
                async move {
                    black_box(ours_sized(&c, &v, size, n + (1 << 40)).await);
                }
            };
            let (rc, v) = (raw.clone(), value.clone());
            let raw_miss = move |n| {
                let (mut conn, v) = (rc.clone(), v.clone());
                async move {
                    let key = format!("raw-size-miss:{n}");
                    let hit: Option<Vec<u8>> = conn.get(&key).await.expect("GET");
                    assert!(hit.is_none());
                    let value = (*v).clone();
                    let bytes = bincode::serde::encode_to_vec(&value, bincode_config()).expect("encode");
                    let _: () = conn.pset_ex(&key, bytes, 3_600_000).await.expect("SET PX");
                    black_box(value);
                }
            };
            let (ours, raw_miss) = pair(tasks, max_ops, ours, raw_miss).await;
            flush(&mut conn).await;
            misses.push(Pair { what: format!("{size} B"), tasks, ours, raw: raw_miss });
        }
        why.push(where_time_goes(&cache, &memory, raw, size, value).await);
    }
    report_errors("value size", &cache);
    print_pairs("Value size, hits (raw: GET + bincode decode of the same bytes)", "value", &hits);
    print_pairs("Value size, misses, body clones the value (raw: GET nil, encode, SET PX)", "value", &misses);
    println!("\nValue size, where a call's time goes (p50 at 1 task; encode, decode and SHA-1 without Redis)");
    println!(
        "{:<10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>11} {:>9} {:>9}",
        "value", "encode", "decode", "SHA-1", "GET", "GET+decode", "ours hit", "ours memory", "SET PX", "Lua SET"
    );
    for line in why {
        println!("{line}");
    }
}

/// The median of `call` at 1 task over a quarter of a row's time, on a
/// worker thread like every other row (the CPU rows too: a loop on the
/// runtime's own thread allocates from another malloc arena).
async fn p50<F, Fut>(call: F) -> Duration
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    measure_for(run_time() / 4, 1, u64::MAX, call).await.p50
}

/// One line of the "where the time goes" table: bincode and SHA-1 alone,
/// the raw client moving the bytes with and without decoding them, our
/// Redis hit, our memory-only hit (key, moka, our codec; no Redis), and
/// the raw client writing the bytes with `SET PX` and through a Lua
/// script's argument (as our store does).
async fn where_time_goes(
    cache: &Cache,
    memory: &Cache,
    raw: &MultiplexedConnection,
    size: usize,
    value: Arc<Page>,
) -> String {
    let bytes = Arc::new(bincode::serde::encode_to_vec(&*value, bincode_config()).expect("encode"));
    let v = value.clone();
    let encode = p50(move |_| {
        let v = v.clone();
        async move {
            black_box(bincode::serde::encode_to_vec(black_box(&*v), bincode_config()).expect("encode"));
        }
    });
    let b = bytes.clone();
    let decode = p50(move |_| {
        let b = b.clone();
        async move {
            black_box(decode_page(black_box(&b)));
        }
    });
    let b = bytes.clone();
    let sha1 = p50(move |_| {
        let b = b.clone();
        async move {
            black_box(sha1_smol::Sha1::from(black_box(&b[..])).digest().to_string());
        }
    });
    let (encode, decode, sha1) = (encode.await, decode.await, sha1.await);
    let mut conn = raw.clone();
    let _: () = conn.set("raw-size:0", &*bytes).await.expect("SET");
    let c = raw.clone();
    let get = p50(move |_| {
        let mut c = c.clone();
        async move {
            let bytes: Vec<u8> = c.get("raw-size:0").await.expect("GET");
            black_box(bytes);
        }
    })
    .await;
    let c = raw.clone();
    let get_decode = p50(move |_| {
        let mut c = c.clone();
        async move {
            let bytes: Vec<u8> = c.get("raw-size:0").await.expect("GET");
            black_box(decode_page(&bytes));
        }
    })
    .await;
    ours_sized(cache, &value, size, 0).await;
    let (c, v) = (cache.clone(), value.clone());
    let ours = p50(move |_| {
        let (c, v) = (c.clone(), v.clone());
        async move {
            black_box(ours_sized(&c, &v, size, 0).await);
        }
    })
    .await;
    ours_sized(memory, &value, size, 0).await;
    let (m, v) = (memory.clone(), value.clone());
    let local = p50(move |_| {
        let (m, v) = (m.clone(), v.clone());
        async move {
            black_box(ours_sized(&m, &v, size, 0).await);
        }
    })
    .await;
    let (c, b) = (raw.clone(), bytes.clone());
    let set = p50(move |_| {
        let (mut c, b) = (c.clone(), b.clone());
        async move {
            let _: () = c.pset_ex("raw-size-set", &*b, 3_600_000).await.expect("SET PX");
        }
    })
    .await;
    let script = Arc::new(redis::Script::new("return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])"));
    let (c, b) = (raw.clone(), bytes.clone());
    let eval = p50(move |_| {
        let (mut c, b, script) = (c.clone(), b.clone(), script.clone());
        async move {
            let _: () = script.key("raw-size-set").arg(&*b).arg(3_600_000).invoke_async(&mut c).await.expect("EVALSHA");
        }
    })
    .await;
    let ms = |d: Duration| format!("{d:.1?}");
    format!(
        "{:<10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>11} {:>9} {:>9}",
        format!("{size} B"),
        ms(encode),
        ms(decode),
        ms(sha1),
        ms(get),
        ms(get_decode),
        ms(ours),
        ms(local),
        ms(set),
        ms(eval)
    )
}
