//! Limits: settings that used to panic or switch caching off, secrets that
//! used to leak into messages, and memory that used to grow without bound
//! or follow what a stored entry claims. Real Redis servers; the crash
//! case runs in a child process, so a crash fails the test instead of
//! killing the harness.

#[path = "support/largest.rs"]
mod largest;
mod support;

use cache_runtime::{Cache, Error, Policy, Stats};
use largest::LARGEST;
use rand::{Rng, SeedableRng};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;
use support::{RedisServer, entry_keys, run};

const DEADLINE: Duration = Duration::from_secs(60);

fn cache_for(url: &str, key_prefix: &str) -> cache_runtime::CacheBuilder {
    support::patient_cache(url, key_prefix)
}

async fn fetch<T>(cache: &Cache, policy: &Policy, value: T, computed: &AtomicUsize) -> T
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    fetch_key(cache, policy, 1, value, computed).await
}

async fn fetch_key<T>(cache: &Cache, policy: &Policy, key: u32, value: T, computed: &AtomicUsize) -> T
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let result = cache
        .get_or_compute(policy, &key, async {
            computed.fetch_add(1, SeqCst);
            Ok::<_, String>(value)
        })
        .await;
    result.unwrap_or_else(|e| panic!("the computation does not fail: {e}"))
}

/// Rewrites the payload of the only entry under `key_prefix`, keeping its
/// header: a corrupt or foreign entry that looks current.
fn plant_payload(server: &RedisServer, key_prefix: &str, payload: &[u8]) {
    let mut conn = server.conn();
    let keys = entry_keys(&mut conn, &format!("{key_prefix}:*"));
    assert_eq!(keys.len(), 1, "{keys:?}");
    let entry: Vec<u8> = redis::cmd("GET").arg(&keys[0]).query(&mut conn).expect("GET");
    let header_end = entry.iter().enumerate().filter(|(_, b)| **b == b'|').nth(3).map(|(i, _)| i + 1);
    let mut planted = entry[..header_end.expect("an entry has a four-part header")].to_vec();
    planted.extend_from_slice(payload);
    let () = redis::cmd("SET").arg(&keys[0]).arg(planted).query(&mut conn).expect("SET");
}

// --- settings ------------------------------------------------------------

/// A lock timeout of `Duration::MAX` used to overflow `Instant + Duration`
/// (a panic); one under a millisecond became `PX 0`, which Redis refuses,
/// so a miss whose lookup beat the timeout never stored its value.
#[test]
fn extreme_policy_lock_timeouts_neither_panic_nor_disable_caching() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache_for(&server.url(), "limits-lock").build().expect("valid settings");
        // A warm connection, so lookups take well under a millisecond.
        fetch(&cache, &Policy::new("warm").ttl(Duration::from_secs(60)), 0u64, &AtomicUsize::new(0)).await;
        for (name, timeout) in [("huge", Duration::MAX), ("tiny", Duration::from_micros(999))] {
            let policy = Policy::new(name).ttl(Duration::from_secs(60)).lock_timeout(timeout);
            let computed = AtomicUsize::new(0);
            for key in 0..20 {
                for _ in 0..2 {
                    assert_eq!(fetch_key(&cache, &policy, key, 7u64, &computed).await, 7);
                }
            }
            let counts = cache.stats().prefix(name).copied().unwrap_or_default();
            assert_eq!(computed.load(SeqCst), 20, "{name} lock timeout: each key stored once, then hit: {counts:?}");
            assert_eq!((counts.hits, counts.server_errors), (20, 0), "{name}: {counts:?}");
        }
    });
}

#[test]
fn builder_settings_out_of_range_are_named_errors() {
    let url = "redis://127.0.0.1:1";
    for (builder, setting) in [
        (Cache::builder().url(url).lock_timeout(Duration::MAX), "lock_timeout"),
        (Cache::builder().url(url).lock_timeout(Duration::from_micros(500)), "lock_timeout"),
        (Cache::builder().url(url).circuit_breaker(3, Duration::MAX), "cool_down"),
        (Cache::builder().url(url).default_ttl(Duration::MAX), "default_ttl"),
        (Cache::builder().url(url).max_value_bytes(0), "max_value_bytes"),
        (Cache::builder().url(url).pool_size(1 << 40), "pool_size"),
    ] {
        match builder.build() {
            Err(e @ Error::InvalidConfig(_)) => assert!(e.to_string().contains(setting), "{setting}: {e}"),
            other => panic!("{setting}: {other:?}"),
        }
    }
}

// --- secrets -------------------------------------------------------------

/// `text` percent-encoded for a URL, every byte but letters and digits.
fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// Builders over many URL shapes with `secret` in them, well-formed or
/// not, each with the texts that must never show.
fn builders_with(secret: &str) -> Vec<(String, Box<dyn Fn() -> cache_runtime::CacheBuilder>)> {
    let encoded = percent_encoded(secret);
    let mut urls = vec![
        format!("redis://app:{secret}@127.0.0.1:6379/0"),
        format!("redis://:{secret}@127.0.0.1"),
        format!("redis://:{encoded}@127.0.0.1:6379/2"),
        format!("redis://app:{encoded}@127.0.0.1:6379/0"),
        format!("redis//:{secret}@127.0.0.1:6379/0"),
        format!("redis:/:{secret}@127.0.0.1:6379/0"),
        format!("redis:{secret}@127.0.0.1"),
        format!("redis://:{secret}@127.0.0.1:notaport"),
        format!("redis://:{encoded}@127.0.0.1:6379/notadb"),
        format!("redis://:{secret}@"),
        format!("http://:{secret}@127.0.0.1"),
        format!("{secret}@127.0.0.1:6379"),
        format!(":{secret}@127.0.0.1:6379"),
        format!("redis://127.0.0.1:6379/0?pass={encoded}"),
        format!("redis+unix:///tmp/redis.sock?db=1&pass={encoded}"),
        format!("redis+unix:///tmp/redis.sock?pass={secret}"),
        format!("redis+unix:///tmp/redis.sock?db=x&pass={encoded}&user=app"),
        format!("unix:///tmp/redis.sock?%70ass={encoded}"),
        format!("rediss://:{encoded}@127.0.0.1:6380"),
        format!("rediss://:{secret}@127.0.0.1:6380/#insecure"),
    ];
    urls.push(format!("redis://127.0.0.1:6379/0?password={secret}&db=1"));
    let mut builders: Vec<(String, Box<dyn Fn() -> cache_runtime::CacheBuilder>)> = Vec::new();
    for url in urls {
        let shown = url.clone();
        builders.push((shown, Box::new(move || Cache::builder().url(url.clone()))));
    }
    #[cfg(feature = "sentinel")]
    {
        let sentinels = [
            format!("redis://:{encoded}@127.0.0.1:26379"),
            format!("redis//:{secret}@127.0.0.1:26380"),
            format!("redis://:{secret}@127.0.0.1:26381"),
        ];
        builders.push((
            format!("sentinel {sentinels:?}"),
            Box::new(move || Cache::builder().sentinel(sentinels.clone(), "mymaster")),
        ));
    }
    #[cfg(feature = "cluster")]
    {
        for nodes in [
            vec![format!("redis://:{encoded}@127.0.0.1:7000"), format!("redis://:{encoded}@127.0.0.1:7001")],
            vec![format!("redis://:{encoded}@127.0.0.1:7000"), format!("redis//:{secret}@127.0.0.1:7001")],
            vec![format!("redis+unix:///tmp/x.sock?pass={encoded}")],
        ] {
            builders.push((format!("cluster {nodes:?}"), Box::new(move || Cache::builder().cluster(nodes.clone()))));
        }
    }
    #[cfg(feature = "tls")]
    {
        let key = format!("-----BEGIN PRIVATE KEY-----\n{encoded}{secret}\n-----END PRIVATE KEY-----\n");
        let url = format!("rediss://:{encoded}@127.0.0.1:6380");
        builders.push((
            "a rediss URL with a client key".to_owned(),
            Box::new(move || {
                Cache::builder().url(url.clone()).tls_client_certificate(b"not a cert".to_vec(), key.clone())
            }),
        ));
        let key = format!("{secret}{secret}");
        builders.push((
            "a client key for a plain URL".to_owned(),
            Box::new(move || {
                Cache::builder().url("redis://127.0.0.1").tls_client_certificate(b"c".to_vec(), key.clone())
            }),
        ));
    }
    builders
}

/// Property: for random passwords (letters, digits and URL punctuation)
/// in every URL shape, neither the password nor its percent-encoding
/// appears in the builder's `Debug`, the cache's `Debug`, or the `Display`
/// or `Debug` of any error `build` returns. Replay with LIMITS_SEED.
#[test]
fn no_password_shows_in_any_message_whatever_the_url_shape() {
    let seed = std::env::var("LIMITS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    println!("LIMITS_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    const ALPHABET: &[u8] = b"abcdefXYZ0123456789@:/?#%&=+!$*;,[]~.-_ ";
    for round in 0..200 {
        let length = rng.random_range(6..24);
        let tail: String = (0..length).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect();
        // A leading `Q` no message has, so that any hit is the secret.
        let secret = format!("Q{tail}");
        let encoded = percent_encoded(&secret);
        for (shape, builder) in builders_with(&secret) {
            let mut shown = vec![format!("{:?}", builder())];
            match builder().build() {
                Ok(cache) => shown.push(format!("{cache:?}")),
                Err(e) => shown.extend([format!("{e}"), format!("{e:?}")]),
            }
            for text in shown {
                for needle in [&secret, &encoded] {
                    assert!(
                        !text.contains(needle.as_str()),
                        "seed {seed}, round {round}: {shape} leaks {needle:?} in {text:?}"
                    );
                }
            }
        }
    }
}

// --- memory --------------------------------------------------------------

#[test]
fn entries_over_max_value_bytes_are_not_decoded() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let policy = Policy::new("big").ttl(Duration::from_secs(60));
        let writer = cache_for(&server.url(), "limits-big").build().expect("valid settings");
        let computed = AtomicUsize::new(0);
        let big = "x".repeat(64 << 10);
        fetch(&writer, &policy, big.clone(), &computed).await;
        assert_eq!(fetch(&writer, &policy, String::new(), &computed).await, big, "stored");

        let reader = cache_for(&server.url(), "limits-big").max_value_bytes(1024).build().expect("valid settings");
        let got = fetch(&reader, &policy, "small".to_owned(), &computed).await;
        assert!(got == "small", "a {}-byte entry was decoded by a cache of max_value_bytes 1 KiB", got.len());
        let counts = reader.stats().prefix("big").copied().unwrap_or_default();
        assert!(counts.decode_errors >= 1 && counts.hits == 0, "{counts:?}");
    });
}

#[test]
fn a_claimed_length_is_not_allocated() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache_for(&server.url(), "limits-claim").build().expect("valid settings");
        let policy = Policy::new("claim").ttl(Duration::from_secs(60));
        let computed = AtomicUsize::new(0);
        fetch(&cache, &policy, "stored".to_owned(), &computed).await;
        // bincode: a string whose u32 length prefix says 200 MiB, then 4 bytes.
        let mut payload = vec![252u8];
        payload.extend_from_slice(&(200u32 << 20).to_le_bytes());
        payload.extend_from_slice(b"abcd");
        plant_payload(&server, "limits-claim", &payload);
        LARGEST.store(0, SeqCst);
        assert_eq!(fetch(&cache, &policy, "recomputed".to_owned(), &computed).await, "recomputed");
        let largest = LARGEST.load(SeqCst);
        assert!(largest < 64 << 20, "decoding allocated {largest} bytes for a 9-byte payload");
        let counts = cache.stats().prefix("claim").copied().unwrap_or_default();
        assert_eq!(counts.decode_errors, 1, "{counts:?}");
    });
}

/// A recursive type: one byte of bincode per level.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
enum Nest {
    Leaf,
    Node(Box<Nest>),
}

/// An entry nested a million levels deep is a counted decode error, not a
/// stack overflow. The call runs in a child process (this test binary
/// again, with LIMITS_CHILD_URL set), on a thread of 1 MiB of stack: an
/// overflow aborts the child, which fails this test.
#[test]
fn deep_nesting_is_a_counted_decode_error() {
    let policy = || Policy::new("nest").ttl(Duration::from_secs(60));
    let builder = |url: &str| cache_for(url, "limits-nest").max_value_bytes(4 << 20);
    if let Ok(url) = std::env::var("LIMITS_CHILD_URL") {
        let outcome = std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                runtime.block_on(async {
                    let cache = builder(&url).build().expect("valid settings");
                    let computed = AtomicUsize::new(0);
                    let got = fetch(&cache, &policy(), Nest::Leaf, &computed).await;
                    let counts = cache.stats().prefix("nest").copied().unwrap_or_default();
                    format!("got={got:?} computed={} decode_errors={}", computed.load(SeqCst), counts.decode_errors)
                })
            })
            .expect("thread")
            .join()
            .expect("the child's call returns");
        println!("CHILD {outcome}");
        return;
    }
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = builder(&server.url()).build().expect("valid settings");
        fetch(&cache, &policy(), Nest::Leaf, &AtomicUsize::new(0)).await;
    });
    let mut payload = vec![1u8; 1 << 20];
    payload.push(0);
    plant_payload(&server, "limits-nest", &payload);
    let child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["deep_nesting_is_a_counted_decode_error", "--exact", "--nocapture", "--test-threads=1"])
        .env("LIMITS_CHILD_URL", server.url())
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&child.stdout);
    let stderr = String::from_utf8_lossy(&child.stderr);
    assert!(child.status.success(), "the child crashed: {:?}\n{stdout}\n{stderr}", child.status);
    assert!(stdout.contains("CHILD got=Leaf computed=1 decode_errors=1"), "{stdout}\n{stderr}");
}

#[test]
fn dynamic_prefixes_do_not_grow_the_stats_without_bound() {
    run(DEADLINE, async {
        let cache = Cache::builder().build().expect("memory-only");
        let computed = AtomicUsize::new(0);
        for n in 0..Stats::MAX_PREFIXES + 500 {
            let policy = Policy::new(format!("report-{n}")).ttl(Duration::from_secs(60));
            fetch(&cache, &policy, n, &computed).await;
        }
        let stats = cache.stats();
        assert!(stats.prefixes.len() <= Stats::MAX_PREFIXES + 1, "{} prefixes", stats.prefixes.len());
        assert_eq!(stats.prefix(Stats::OTHER).map(|c| c.misses), Some(500));
        assert_eq!(stats.total.misses, Stats::MAX_PREFIXES as u64 + 500);
    });
}
