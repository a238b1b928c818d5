//! One `tracing` span per cached call, with its prefix, key and outcome.
//!
//! In a test binary of its own: `tracing` caches whether a callsite is
//! enabled, and a test on another thread, without a subscriber, that
//! registers the callsite while this one installs its subscriber can leave
//! it cached as disabled.

mod support;

use cache_runtime::{Cache, cached};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::RedisServer;

fn cache_for(url: &str) -> Cache {
    Cache::builder()
        .url(url)
        .key_prefix("spans")
        .command_timeout(Duration::from_millis(200))
        .connect_timeout(Duration::from_millis(200))
        .build()
        .expect("valid cache settings")
}

#[cached(ttl = 60, prefix = "products", cache = cache)]
async fn product(cache: &Cache, id: u32) -> String {
    format!("product {id}")
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
        if !attrs.metadata().name().starts_with("cached") {
            return;
        }
        let mut fields = vec![("span".to_owned(), attrs.metadata().name().to_owned())];
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

#[cached(ttl = 60, prefix = "pages", batch(ids), cache = cache)]
async fn page(cache: &Cache, ids: Vec<u32>) -> Vec<(u32, String)> {
    ids.into_iter().map(|id| (id, format!("product {id}"))).collect()
}

#[test]
fn each_call_has_a_debug_span_with_prefix_outcome_and_key() {
    use tracing_subscriber::layer::SubscriberExt;
    let server = RedisServer::start();
    let recorder = SpanRecorder::default();
    let subscriber = tracing_subscriber::registry().with(recorder.clone());
    let _guard = tracing::subscriber::set_default(subscriber);
    let cache = cache_for(&server.url());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        product(&cache, 7).await;
        product(&cache, 7).await;
        page(&cache, vec![1, 2, 3]).await;
        page(&cache, vec![3, 4, 1, 3]).await;
    });
    let field = |span: &SpanFields, name: &str| {
        span.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap_or_default()
    };
    let all = recorder.0.lock().unwrap().clone();
    let (spans, bulk): (Vec<SpanFields>, Vec<SpanFields>) = all.into_iter().partition(|s| field(s, "span") == "cached");
    assert_eq!(spans.len(), 2, "{spans:?}");
    // A bulk call: one span, with how many distinct items and how many hit.
    assert_eq!(bulk.len(), 2, "{bulk:?}");
    assert_eq!(field(&bulk[0], "span"), "cached_many");
    assert_eq!(field(&bulk[0], "prefix"), "pages");
    assert_eq!((field(&bulk[0], "items"), field(&bulk[0], "hits")), ("3".to_owned(), "0".to_owned()));
    assert_eq!((field(&bulk[1], "items"), field(&bulk[1], "hits")), ("3".to_owned(), "2".to_owned()));
    assert_eq!(field(&spans[0], "prefix"), "products");
    assert_eq!(field(&spans[0], "outcome"), "miss");
    assert_eq!(field(&spans[1], "outcome"), "hit");
    let key = field(&spans[0], "key");
    assert_eq!(key.len(), 8, "a short key hash: {key}");
    assert_eq!(key, field(&spans[1], "key"));
}
