//! What users watch: exact counts for a scripted sequence of calls, and
//! (feature `metrics`) the metrics facade. Spans are in `tests/spans.rs`.

mod support;

use cache_runtime::{Cache, Policy, cached};
use std::time::Duration;
use support::{RedisServer, run};

const DEADLINE: Duration = Duration::from_secs(30);

fn cache_for(url: &str) -> Cache {
    Cache::builder()
        .url(url)
        .key_prefix("obs")
        .command_timeout(Duration::from_millis(200))
        .connect_timeout(Duration::from_millis(200))
        .circuit_breaker(3, Duration::from_secs(60))
        .build()
        .expect("valid cache settings")
}

#[cached(ttl = 60, prefix = "products", cache = cache)]
async fn product(cache: &Cache, id: u32) -> String {
    format!("product {id}")
}

#[cached(ttl = 60, prefix = "users", cache = cache)]
async fn user(cache: &Cache, id: u32) -> Result<String, String> {
    if id == 0 { Err("no user 0".into()) } else { Ok(format!("user {id}")) }
}

#[test]
fn a_scripted_sequence_gives_exact_counts() {
    let mut server = RedisServer::start();
    let cache = cache_for(&server.url());
    run(DEADLINE, async {
        product(&cache, 1).await; // miss
        product(&cache, 1).await; // hit
        product(&cache, 1).await; // hit
        product(&cache, 2).await; // miss
        user(&cache, 1).await.unwrap(); // miss
        user(&cache, 1).await.unwrap(); // hit
        user(&cache, 0).await.unwrap_err(); // miss, Err not stored
        user(&cache, 0).await.unwrap_err(); // miss again
        cache.invalidate("products").await.unwrap();
        product(&cache, 1).await; // stale: miss
        let policy = Policy::new("reports").ttl(Duration::from_secs(60));
        for _ in 0..3 {
            let _: Result<u8, ()> = cache.get_or_compute(&policy, "q3", async { Ok(3) }).await; // miss, hit, hit
        }
    });
    let stats = cache.stats();
    let products = stats.prefix("products").copied().unwrap_or_default();
    assert_eq!((products.hits, products.misses, products.stale, products.writes), (2, 3, 1, 3), "{products:?}");
    let users = stats.prefix("users").copied().unwrap_or_default();
    assert_eq!((users.hits, users.misses, users.writes, users.computations), (1, 3, 1, 3), "{users:?}");
    let reports = stats.prefix("reports").copied().unwrap_or_default();
    assert_eq!((reports.hits, reports.misses), (2, 1));
    assert_eq!((stats.total.hits, stats.total.misses, stats.total.bypassed), (5, 7, 0));
    assert_eq!(stats.total.errors(), 0);
    assert!((stats.hit_rate() - 5.0 / 12.0).abs() < 1e-9, "{}", stats.hit_rate());
    assert!(stats.total.bytes_read > 0 && stats.total.bytes_written > stats.total.bytes_read / 2);

    // Redis stops: the first failures are connection errors, then the
    // breaker (3 failures) takes over; every call is a bypass.
    server.kill();
    run(DEADLINE, async {
        for id in 0..10 {
            assert_eq!(product(&cache, id).await, format!("product {id}"));
        }
        assert!(cache.invalidate("products").await.is_err());
    });
    let after = cache.stats();
    let products = after.prefix("products").copied().unwrap_or_default();
    assert_eq!(products.bypassed, 10);
    assert_eq!(products.connection_errors, 3, "{products:?}");
    assert_eq!(products.breaker_rejections, 7, "{products:?}");
    assert_eq!(after.total.connection_errors, 4, "the failed invalidate counts outside any prefix");
    assert_eq!(after.total.computations, stats.total.computations + 10);
}

#[cfg(feature = "metrics")]
#[test]
fn the_metrics_feature_emits_calls_durations_and_errors() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let mut server = RedisServer::start();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let cache = cache_for(&server.url());
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            product(&cache, 1).await;
            product(&cache, 1).await;
            product(&cache, 1).await;
        });
        server.kill();
        runtime.block_on(async {
            product(&cache, 2).await;
        });
    });
    let metrics = snapshotter.snapshot().into_vec();
    let counter = |name: &str, labels: &[(&str, &str)]| -> u64 {
        metrics
            .iter()
            .filter(|(key, _, _, _)| key.key().name() == name)
            .filter(|(key, _, _, _)| {
                labels.iter().all(|(k, v)| key.key().labels().any(|l| l.key() == *k && l.value() == *v))
            })
            .map(|(_, _, _, value)| match value {
                DebugValue::Counter(n) => *n,
                DebugValue::Histogram(values) => values.len() as u64,
                DebugValue::Gauge(_) => 0,
            })
            .sum()
    };
    let hit = [("prefix", "products"), ("outcome", "hit")];
    assert_eq!(counter("cache_runtime_calls_total", &hit), 2);
    assert_eq!(counter("cache_runtime_calls_total", &[("outcome", "miss")]), 1);
    assert_eq!(counter("cache_runtime_calls_total", &[("outcome", "bypass")]), 1);
    assert_eq!(counter("cache_runtime_call_duration_seconds", &hit), 2, "one latency sample per hit");
    assert_eq!(counter("cache_runtime_errors_total", &[("kind", "connection")]), 1);
}
