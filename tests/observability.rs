//! What users watch: exact counts for a scripted sequence of calls, one
//! `tracing` span per call, and (feature `metrics`) the metrics facade.

mod support;

use cache_runtime::{Cache, Policy, cached};
use std::sync::{Arc, Mutex};
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

/// One span's fields, as recorded: name and value.
type SpanFields = Vec<(String, String)>;

/// Records the fields of every `cached` span.
#[derive(Clone, Default)]
struct SpanRecorder(Arc<Mutex<Vec<SpanFields>>>);

struct FieldVisitor<'a>(&'a mut SpanFields);

impl tracing::field::Visit for FieldVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

impl<S> tracing_subscriber::Layer<S> for SpanRecorder
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() != "cached" {
            return;
        }
        let mut fields = Vec::new();
        attrs.record(&mut FieldVisitor(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<SpanFields>()
        {
            values.record(&mut FieldVisitor(fields));
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if let Some(span) = ctx.span(&id)
            && let Some(fields) = span.extensions_mut().remove::<SpanFields>()
            && let Ok(mut spans) = self.0.lock()
        {
            spans.push(fields);
        }
    }
}

#[test]
fn each_call_has_a_debug_span_with_prefix_outcome_and_key() {
    use tracing_subscriber::layer::SubscriberExt;
    let server = RedisServer::start();
    let recorder = SpanRecorder::default();
    let subscriber = tracing_subscriber::registry().with(recorder.clone());
    let _guard = tracing::subscriber::set_default(subscriber);
    // Another test of this binary, on another thread without a subscriber,
    // may have hit the callsite first and cached "never" for it.
    tracing::callsite::rebuild_interest_cache();
    let cache = cache_for(&server.url());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        product(&cache, 7).await;
        product(&cache, 7).await;
    });
    let spans = recorder.0.lock().unwrap().clone();
    assert_eq!(spans.len(), 2, "{spans:?}");
    let field = |span: &SpanFields, name: &str| {
        span.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap_or_default()
    };
    assert_eq!(field(&spans[0], "prefix"), "products");
    assert_eq!(field(&spans[0], "outcome"), "miss");
    assert_eq!(field(&spans[1], "outcome"), "hit");
    let key = field(&spans[0], "key");
    assert_eq!(key.len(), 8, "a short key hash: {key}");
    assert_eq!(key, field(&spans[1], "key"));
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
