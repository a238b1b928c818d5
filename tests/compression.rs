//! Compression of stored entries against a real Redis: what is stored
//! above and below the threshold with each algorithm, entries written
//! before compression, crafted and corrupt compressed entries, the
//! attribute's and the policy's override, and the stampede lock's re-check
//! finding a compressed entry.

#[path = "support/largest.rs"]
mod largest;
mod support;

use cache_runtime::{Cache, CacheBuilder, Compression, Policy, cached};
use largest::LARGEST;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;
use support::{RedisServer, entry_keys, run};

const DEADLINE: Duration = Duration::from_secs(30);

fn builder(server: &RedisServer, key_prefix: &str) -> CacheBuilder {
    support::patient_cache(&server.url(), key_prefix)
}

/// A product list as a JSON-like text: compresses well, as real ones do.
fn listing(items: usize) -> String {
    (0..items)
        .map(|i| format!("{{\"id\":{i},\"name\":\"product {i}\",\"price_cents\":{},\"in_stock\":true}}", 100 + i))
        .collect::<Vec<_>>()
        .join(",")
}

async fn fetch(cache: &Cache, policy: &Policy, value: &str, computed: &AtomicUsize) -> String {
    let result = cache
        .get_or_compute(policy, &1u32, async {
            computed.fetch_add(1, SeqCst);
            Ok::<_, String>(value.to_owned())
        })
        .await;
    result.unwrap_or_else(|e| panic!("the computation does not fail: {e}"))
}

/// The only entry under `pattern`: its key and bytes.
fn the_entry(server: &RedisServer, pattern: &str) -> (String, Vec<u8>) {
    let mut conn = server.conn();
    let keys = entry_keys(&mut conn, pattern);
    assert_eq!(keys.len(), 1, "{keys:?}");
    let entry: Vec<u8> = redis::cmd("GET").arg(&keys[0]).query(&mut conn).expect("GET");
    (keys[0].clone(), entry)
}

/// The header up to and including the `|` before the payload.
fn header(entry: &[u8]) -> &[u8] {
    let end = entry.iter().enumerate().filter(|(_, b)| **b == b'|').nth(3).map(|(i, _)| i + 1);
    &entry[..end.expect("an entry has a four-part header")]
}

fn set(server: &RedisServer, key: &str, bytes: &[u8]) {
    let () = redis::cmd("SET").arg(key).arg(bytes).query(&mut server.conn()).expect("SET");
}

fn algorithms() -> Vec<(Compression, &'static str)> {
    #[allow(unused_mut)]
    let mut all = vec![(Compression::Lz4, "RC2|bl|")];
    #[cfg(feature = "zstd")]
    all.push((Compression::Zstd, "RC2|bz|"));
    all
}

#[test]
fn values_round_trip_compressed_above_the_threshold_and_raw_below() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let big = listing(40);
        assert!(big.len() > 2048, "{}", big.len());
        let small = listing(1);
        for (compression, head) in algorithms() {
            let key_prefix = format!("round-{}", compression.name());
            let writer = builder(&server, &key_prefix).compression(compression).compress_threshold(1024);
            let writer = writer.build().expect("valid settings");
            // A second cache: its hits come from Redis, not from the writer.
            let reader = builder(&server, &key_prefix).compression(compression).build().expect("valid settings");
            for (prefix, value, expected_head) in [("big", &big, head), ("small", &small, "RC2|b|")] {
                let policy = Policy::new(prefix).ttl(Duration::from_secs(60));
                let computed = AtomicUsize::new(0);
                assert_eq!(&fetch(&writer, &policy, value, &computed).await, value);
                assert_eq!(&fetch(&reader, &policy, "recomputed", &computed).await, value, "{compression:?} {prefix}");
                assert_eq!(computed.load(SeqCst), 1, "{compression:?} {prefix}: the reader hit");
                let (_, entry) = the_entry(&server, &format!("{key_prefix}:{prefix}:*"));
                assert!(entry.starts_with(expected_head.as_bytes()), "{compression:?} {prefix}: {:?}", header(&entry));
                let stored = entry.len() - header(&entry).len();
                if prefix == "big" {
                    assert!(stored * 3 < value.len(), "{compression:?}: {stored} bytes stored of {}", value.len());
                }
            }
            assert_eq!(reader.stats().total.decode_errors, 0);
        }
    });
}

#[test]
fn an_entry_written_before_compression_still_reads() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let big = listing(40);
        let policy = Policy::new("old").ttl(Duration::from_secs(60));
        let computed = AtomicUsize::new(0);
        // What every release before compression wrote: `RC2|b|`, the
        // payload as encoded.
        let old = builder(&server, "before").compression(Compression::None).build().expect("valid settings");
        fetch(&old, &policy, &big, &computed).await;
        let (_, entry) = the_entry(&server, "before:old:*");
        assert!(entry.starts_with(b"RC2|b|") && entry.len() > big.len(), "{:?}", header(&entry));
        for (compression, _) in algorithms() {
            let new = builder(&server, "before").compression(compression).build().expect("valid settings");
            assert_eq!(fetch(&new, &policy, "recomputed", &computed).await, big, "{compression:?}");
            assert_eq!(new.stats().total.hits, 1, "{compression:?}");
        }
        assert_eq!(computed.load(SeqCst), 1);
    });
}

#[test]
fn a_crafted_entry_claiming_a_huge_size_is_a_counted_miss_without_allocating_it() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = builder(&server, "crafted").build().expect("valid settings");
        let policy = Policy::new("claim").ttl(Duration::from_secs(60));
        let computed = AtomicUsize::new(0);
        fetch(&cache, &policy, &listing(40), &computed).await;
        let (key, entry) = the_entry(&server, "crafted:claim:*");
        assert!(entry.starts_with(b"RC2|bl|"), "{:?}", header(&entry));
        // A current header, then an lz4 block claiming 1 GiB.
        for claimed in [1u32 << 30, 900 << 10] {
            let mut crafted = header(&entry).to_vec();
            crafted.extend_from_slice(&claimed.to_le_bytes());
            crafted.extend_from_slice(&[0x1f, b'a', 0x01, 0x00, 0xff, 0xff, 0xff, 0xff]);
            set(&server, &key, &crafted);
            LARGEST.store(0, SeqCst);
            let errors = cache.stats().total.decode_errors;
            assert_eq!(fetch(&cache, &policy, "recomputed", &computed).await, "recomputed");
            let largest = LARGEST.load(SeqCst);
            assert!(largest < 512 << 10, "{largest} bytes allocated for a {claimed}-byte claim");
            assert_eq!(cache.stats().total.decode_errors, errors + 1, "counted");
        }
    });
}

#[test]
fn a_corrupt_compressed_entry_is_a_counted_miss_then_recomputed_and_overwritten() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        for (compression, head) in algorithms() {
            let key_prefix = format!("corrupt-{}", compression.name());
            let cache = builder(&server, &key_prefix).compression(compression).build().expect("valid settings");
            let policy = Policy::new("list").ttl(Duration::from_secs(60));
            let computed = AtomicUsize::new(0);
            let big = listing(40);
            fetch(&cache, &policy, &big, &computed).await;
            let (key, entry) = the_entry(&server, &format!("{key_prefix}:list:*"));
            assert!(entry.starts_with(head.as_bytes()));
            // The compressed bytes cut short, under the current header.
            set(&server, &key, &entry[..entry.len() - 20]);
            assert_eq!(fetch(&cache, &policy, &big, &computed).await, big);
            assert_eq!((computed.load(SeqCst), cache.stats().total.decode_errors), (2, 1), "{compression:?}");
            let (_, replaced) = the_entry(&server, &format!("{key_prefix}:list:*"));
            assert!(replaced.starts_with(head.as_bytes()) && replaced.len() + 20 > entry.len(), "overwritten");
            assert_eq!(fetch(&cache, &policy, "recomputed", &computed).await, big);
            assert_eq!((computed.load(SeqCst), cache.stats().total.decode_errors), (2, 1), "{compression:?}: a hit");
        }
    });
}

#[cached(ttl = 60, prefix = "forced", compress = "lz4", cache = cache)]
async fn forced(cache: &Cache, n: usize) -> String {
    listing(n)
}

#[cached(ttl = 60, prefix = "plain", compress = "none", cache = cache)]
async fn plain(cache: &Cache, n: usize) -> String {
    listing(n)
}

#[cached(ttl = 60, prefix = "defaulted", cache = cache)]
async fn defaulted(cache: &Cache, n: usize) -> String {
    listing(n)
}

#[test]
fn the_attribute_and_the_policy_override_the_builder() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let none = builder(&server, "off").compression(Compression::None).build().expect("valid settings");
        let lz4 = builder(&server, "on").compression(Compression::Lz4).build().expect("valid settings");
        for (cache, key_prefix) in [(&none, "off"), (&lz4, "on")] {
            for _ in 0..2 {
                assert_eq!(forced(cache, 40).await, listing(40));
                assert_eq!(plain(cache, 40).await, listing(40));
                assert_eq!(defaulted(cache, 40).await, listing(40));
            }
            assert_eq!(cache.stats().total.hits, 3, "{key_prefix}");
            let head = |prefix: &str| the_entry(&server, &format!("{key_prefix}:{prefix}:*")).1[..7].to_vec();
            assert_eq!(head("forced"), b"RC2|bl|", "{key_prefix}");
            assert_eq!(&head("plain")[..6], b"RC2|b|", "{key_prefix}");
            let expected: &[u8] = if key_prefix == "on" { b"RC2|bl|" } else { b"RC2|b|" };
            assert_eq!(&head("defaulted")[..expected.len()], expected, "{key_prefix}");
        }
        let computed = AtomicUsize::new(0);
        let policy = Policy::new("programmatic").ttl(Duration::from_secs(60)).compress(Compression::None);
        fetch(&lz4, &policy, &listing(40), &computed).await;
        assert!(the_entry(&server, "on:programmatic:*").1.starts_with(b"RC2|b|"));
        let policy = Policy::new("programmatic").ttl(Duration::from_secs(60)).compress(Compression::Lz4);
        let computed = AtomicUsize::new(0);
        fetch(&none, &policy, &listing(40), &computed).await;
        assert!(the_entry(&server, "off:programmatic:*").1.starts_with(b"RC2|bl|"));
    });
}

/// Two processes (two caches) miss one key at once: the one that waits for
/// the other's lock finds the compressed entry in the lock script's
/// re-check, and does not compute it again.
#[test]
fn the_lock_re_check_hits_a_compressed_entry() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let first = builder(&server, "locked").build().expect("valid settings");
        let second = builder(&server, "locked").build().expect("valid settings");
        let policy = Policy::new("slow").ttl(Duration::from_secs(60));
        let computed = AtomicUsize::new(0);
        let compute = |cache: Cache| {
            let (policy, computed) = (policy.clone(), &computed);
            async move {
                cache
                    .get_or_compute(&policy, &1u32, async {
                        computed.fetch_add(1, SeqCst);
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok::<_, String>(listing(40))
                    })
                    .await
            }
        };
        let leader = compute(first.clone());
        let follower = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            compute(second.clone()).await
        };
        let (a, b) = tokio::join!(leader, follower);
        assert_eq!((a, b), (Ok(listing(40)), Ok(listing(40))));
        assert_eq!(computed.load(SeqCst), 1, "computed once across both");
        assert!(the_entry(&server, "locked:slow:*").1.starts_with(b"RC2|bl|"));
        let counts = second.stats().total;
        assert_eq!((counts.hits, counts.decode_errors), (1, 0), "{counts:?}");
    });
}
