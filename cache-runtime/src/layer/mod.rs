//! Whole responses cached as a tower layer (cargo feature `tower`): what
//! Django's `cache_page` does, for axum, tonic or any tower service, with
//! what HTTP says about who may see a response.
//!
//! - Key: the authority, the original path (before axum's `nest` strips
//!   it), the query sorted by name (repeated names keep their order), and
//!   the values of the request headers the response's `Vary` names
//!   (learned per resource, as Django's `learn_cache_key` does), of
//!   `Authorization` and `Cookie`, and of those given to
//!   [`CacheLayer::vary`].
//! - Never stored: `Vary: *`, `Set-Cookie`, `Cache-Control: private`,
//!   `no-store` or `no-cache`, a `206` or any status outside
//!   [`CacheLayer::statuses`] (unless the response has explicit freshness
//!   and RFC 9111 allows its status), a body over
//!   [`CacheLayer::max_body_bytes`] or a `text/event-stream`, which stream
//!   through unbuffered.
//! - A response's `s-maxage`, `max-age` or `Expires` (less its `Age`) caps
//!   the policy's TTL. The client's `no-store` bypasses the cache, its
//!   `no-cache` or `max-age=0` recomputes the entry
//!   ([`CacheLayer::request_cache_control`]).
//! - `If-None-Match` and `If-Modified-Since` are answered with `304` from
//!   the stored response, which has an `ETag` (the body's hash when the
//!   handler gave none, [`CacheLayer::etag`]); hits carry `Age` and
//!   `x-cache: hit`.
//! - A successful unsafe request (`POST`, `PUT`, `DELETE`, ...) through the
//!   layer invalidates the cached `GET`s of its path, and of the paths its
//!   `Location` and `Content-Location` name.
//!
//! Namespace versions, tags, TTL and jitter, stampede protection and the
//! failure handling are those of [`Cache::get_or_compute`].

mod body;
mod key;
mod miss;
mod rules;
mod stored;

use crate::{Cache, Policy};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use key::{EntryKey, Target, normalized};
use miss::Miss;
use rules::{DEFAULT_STATUSES, RequestDirectives};
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use stored::{Conditions, StoredResponse};

/// The body of responses that pass through a [`CacheService`].
pub type CacheBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// What the layer does with a request that carries credentials
/// (`Authorization` or `Cookie`).
///
/// ```
/// use cache_runtime::{Cache, CacheLayer, Credentials, Policy};
///
/// let cache = Cache::builder().build()?;
/// let layer = CacheLayer::new(cache, Policy::new("pages")).credentials(Credentials::Bypass);
/// # Ok::<(), cache_runtime::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Credentials {
    /// Cached per value of `Authorization` and `Cookie`: each session gets
    /// its own copies, never another's.
    #[default]
    PerValue,
    /// Not cached: such requests go to the service every time.
    Bypass,
}

/// Path namespaces: a write invalidates the cached pages of its path's
/// bucket, about one in this many of the layer's pages, with a bounded
/// number of version keys however many paths there are.
const BUCKETS: usize = 65_536;

/// Caches whole `GET` responses of the services it wraps; see the
/// [module documentation](self) for what is keyed, stored and honoured.
///
/// ```
/// use cache_runtime::{Cache, CacheLayer, Policy};
/// use std::time::Duration;
///
/// let cache = Cache::builder().url("redis://127.0.0.1:6379").build()?;
/// let layer = CacheLayer::new(cache, Policy::new("pages").ttl(Duration::from_secs(30)).tags(["products"]))
///     .vary([http::header::ACCEPT_LANGUAGE]);
/// // axum: Router::new().route("/products", get(list)).route_layer(layer)
/// # Ok::<(), cache_runtime::Error>(())
/// ```
#[derive(Clone)]
pub struct CacheLayer {
    cache: Cache,
    settings: Arc<Settings>,
    shared: Arc<Shared>,
}

#[derive(Debug, Clone)]
struct Settings {
    vary: Vec<HeaderName>,
    credentials: Credentials,
    statuses: Vec<u16>,
    request_cache_control: bool,
    etag: bool,
    max_body_bytes: usize,
}

impl Settings {
    /// The request headers every key includes.
    fn base_names(&self) -> Vec<HeaderName> {
        let mut names = self.vary.clone();
        if self.credentials == Credentials::PerValue {
            names.extend([header::AUTHORIZATION, header::COOKIE]);
        }
        names
    }
}

/// What the layer's clones share.
struct Shared {
    policy: Policy,
    /// The policy with one path namespace added, per bucket in use.
    buckets: moka::sync::Cache<usize, Arc<Policy>>,
    /// The request headers each resource was last seen to vary on, shared
    /// across processes through the cache...
    index: Policy,
    /// ...and remembered here for a minute. A stale copy only costs hits:
    /// an entry is stored only under a key covering all of its `Vary`.
    learned: moka::sync::Cache<[u8; 32], Arc<[HeaderName]>>,
}

impl Shared {
    fn bucket_policy(&self, bucket: usize) -> Arc<Policy> {
        self.buckets.get_with(bucket % BUCKETS, || {
            // The policy's own tags, then the path's namespace.
            let mut tags: Vec<Cow<'static, str>> = self.policy.plan().tags.to_vec();
            tags.push(bucket_namespace(&self.policy, bucket).into());
            Arc::new(self.policy.clone().tags(tags))
        })
    }
}

fn bucket_namespace(policy: &Policy, bucket: usize) -> String {
    format!("{}.path.{}", policy.prefix(), bucket % BUCKETS)
}

impl CacheLayer {
    /// Caches responses under `policy` (its prefix, tags, TTL, jitter).
    pub fn new(cache: Cache, policy: Policy) -> Self {
        let index = Policy::new(format!("{}.vary", policy.prefix())).lock(false).ttl(Duration::from_secs(86_400));
        let learned = moka::sync::Cache::builder().max_capacity(10_000).time_to_live(Duration::from_secs(60)).build();
        let buckets = moka::sync::Cache::new(4096);
        Self {
            cache,
            settings: Arc::new(Settings {
                vary: Vec::new(),
                credentials: Credentials::default(),
                statuses: DEFAULT_STATUSES.to_vec(),
                request_cache_control: true,
                etag: true,
                max_body_bytes: 1 << 20,
            }),
            shared: Arc::new(Shared { policy, buckets, index, learned }),
        }
    }

    /// More request headers whose values are part of every key, in
    /// addition to `Authorization`, `Cookie` and each response's `Vary`.
    pub fn vary(mut self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        Arc::make_mut(&mut self.settings).vary.extend(headers);
        self
    }

    /// What to do with requests that carry `Authorization` or `Cookie`
    /// (default: [`Credentials::PerValue`]).
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        Arc::make_mut(&mut self.settings).credentials = credentials;
        self
    }

    /// The statuses stored without explicit freshness (default: 200, 203,
    /// 204, 300, 301, 404, 405, 410, 414, 501). `206` is never stored.
    pub fn statuses(mut self, statuses: impl IntoIterator<Item = u16>) -> Self {
        Arc::make_mut(&mut self.settings).statuses = statuses.into_iter().filter(|s| *s != 206).collect();
        self
    }

    /// Whether the client's `Cache-Control` (and `Pragma: no-cache`) is
    /// honoured: `no-store` bypasses, `no-cache` or `max-age=0` recomputes
    /// (default: true). Turn off where clients are not trusted to cost a
    /// computation.
    pub fn request_cache_control(mut self, honour: bool) -> Self {
        Arc::make_mut(&mut self.settings).request_cache_control = honour;
        self
    }

    /// Whether a stored response without an `ETag` gets one, the hash of
    /// its body (default: true).
    pub fn etag(mut self, etag: bool) -> Self {
        Arc::make_mut(&mut self.settings).etag = etag;
        self
    }

    /// The largest body stored (default: 1 MiB, the cache's default
    /// `max_value_bytes`); larger ones stream through, and so do bodies of
    /// unknown length once they pass it.
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.settings).max_body_bytes = bytes;
        self
    }
}

impl<S> tower_layer::Layer<S> for CacheLayer {
    type Service = CacheService<S>;

    fn layer(&self, inner: S) -> CacheService<S> {
        CacheService { inner, layer: self.clone() }
    }
}

/// The service [`CacheLayer`] wraps around another.
#[derive(Clone)]
pub struct CacheService<S> {
    inner: S,
    layer: CacheLayer,
}

fn boxed<B>(body: B) -> CacheBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    body.map_err(Into::into).boxed_unsync()
}

fn plain(status: StatusCode, text: String) -> Response<CacheBody> {
    let mut response = Response::new(boxed(Full::new(Bytes::from(text))));
    *response.status_mut() = status;
    response
}

/// Why a response was not stored.
enum Uncached<E> {
    /// Not cacheable: returned as is.
    Response(Response<CacheBody>),
    /// It varies on a header the key did not include: to be stored under
    /// the key of all its selecting headers (the second field), with the
    /// request's headers (the third), which are learned for the resource.
    Relearn(StoredResponse, Vec<HeaderName>, HeaderMap),
    /// The inner service failed.
    Service(E),
    /// The body failed while it was being read.
    Body(Box<dyn std::error::Error + Send + Sync>),
    /// The request had already gone to the service.
    Spent,
}

impl<S, ReqBody, ResBody> tower_service::Service<Request<ReqBody>> for CacheService<S>
where
    S: tower_service::Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<CacheBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The ready service goes with this call; its clone serves the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(self.layer.clone().serve(inner, request))
    }
}

impl CacheLayer {
    async fn serve<S, ReqBody, ResBody>(self, mut inner: S, mut request: Request<ReqBody>) -> Result<Response<CacheBody>, S::Error>
    where
        S: tower_service::Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: http_body::Body<Data = Bytes> + Send + 'static,
        ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if request.method() != Method::GET {
            let is_unsafe = ![Method::HEAD, Method::OPTIONS, Method::TRACE].contains(request.method());
            let target = is_unsafe.then(|| Target::of(&request));
            let response = inner.call(request).await?;
            if let Some(target) = target
                && (response.status().is_success() || response.status().is_redirection())
            {
                self.invalidate_after_write(&target, response.headers()).await;
            }
            return Ok(response.map(boxed));
        }
        let settings = self.settings.clone();
        let directives = if settings.request_cache_control {
            RequestDirectives::of(request.headers())
        } else {
            RequestDirectives::default()
        };
        let credentialed =
            request.headers().contains_key(header::AUTHORIZATION) || request.headers().contains_key(header::COOKIE);
        if directives.no_store || (credentialed && settings.credentials == Credentials::Bypass)
        {
            return inner.call(request).await.map(|response| response.map(boxed));
        }
        let target = Target::of(&request);
        let resource = target.resource();
        let names = self.selecting_names(resource).await;
        let key = EntryKey::new(resource, &names, request.headers());
        let policy = &*self.shared.bucket_policy(target.bucket(BUCKETS));
        // A range is served from a stored whole response; on a miss the
        // service answers it (a `206` is never stored).
        let conditions = Conditions::take(request.headers_mut()).with_range(request.headers());

        let computed = AtomicBool::new(false);
        let mut slot = Some(request);
        let mut outcome = if directives.no_cache {
            self.cache.refresh(policy, &key, Miss { settings: &settings, inner: &mut inner, slot: &mut slot, names: &names, computed: &computed, previous: None }.run()).await
        } else {
            self.cache.get_or_compute(policy, &key, Miss { settings: &settings, inner: &mut inner, slot: &mut slot, names: &names, computed: &computed, previous: None }.run()).await
        };
        let now = SystemTime::now();
        let unusable = outcome.as_ref().is_ok_and(|stored| {
            let selected_alike = stored.vary.iter().all(|name| names.iter().any(|n| n.as_str() == name));
            let acceptable = stored.remaining(now).is_ok_and(|left| directives.accepts(stored.age(now), left));
            !computed.load(Relaxed) && (!selected_alike || !acceptable)
        });
        if unusable {
            // Stale, or older than the client accepts: revalidated with the
            // origin's validators, or recomputed.
            let previous = outcome.ok().filter(StoredResponse::has_validators);
            let revalidate = Miss { settings: &settings, inner: &mut inner, slot: &mut slot, names: &names, computed: &computed, previous: previous.as_ref() };
            outcome = self.cache.refresh(policy, &key, revalidate.run()).await;
        }
        let hit = !computed.load(Relaxed);
        match outcome {
            Ok(stored) => {
                if !hit && stored.vary.iter().map(String::as_str).ne(names.iter().map(HeaderName::as_str)) {
                    let varies = stored.vary.iter().filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok());
                    self.learn(resource, varies.collect()).await;
                }
                let age = hit.then(|| stored.age(now));
                Ok(stored.respond(if hit { "hit" } else { "miss" }, age, &conditions))
            }
            Err(Uncached::Response(response)) => Ok(response),
            Err(Uncached::Relearn(stored, varies, headers)) => {
                let key = EntryKey::new(resource, &varies, &headers);
                let fill = async { Ok::<_, std::convert::Infallible>(stored.clone()) };
                let _ = self.cache.refresh(policy, &key, fill).await;
                self.learn(resource, varies).await;
                Ok(stored.respond("miss", None, &conditions))
            }
            Err(Uncached::Service(error)) => Err(error),
            Err(Uncached::Body(error)) => Ok(plain(StatusCode::BAD_GATEWAY, error.to_string())),
            Err(Uncached::Spent) => Ok(plain(StatusCode::INTERNAL_SERVER_ERROR, "request already served".into())),
        }
    }

    /// The request headers that select among `resource`'s stored
    /// variants: the layer's, and those its responses were seen to vary on.
    async fn selecting_names(&self, resource: [u8; 32]) -> Vec<HeaderName> {
        let mut names = self.settings.base_names();
        let learned = match self.shared.learned.get(&resource) {
            Some(learned) => learned,
            None => {
                let absent = async { Err::<Vec<String>, ()>(()) };
                let shared = self.cache.get_or_compute(&self.shared.index, &resource, absent).await.unwrap_or_default();
                let learned: Arc<[HeaderName]> =
                    shared.iter().filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok()).collect();
                self.shared.learned.insert(resource, learned.clone());
                learned
            }
        };
        names.extend(learned.iter().cloned());
        normalized(names)
    }

    /// Remembers the headers `resource` varies on, here and in the cache.
    async fn learn(&self, resource: [u8; 32], names: Vec<HeaderName>) {
        let names = normalized(names);
        self.shared.learned.insert(resource, names.iter().cloned().collect());
        let shared: Vec<String> = names.iter().map(|name| name.as_str().to_owned()).collect();
        let _ = self.cache.refresh(&self.shared.index, &resource, async { Ok::<_, ()>(shared) }).await;
    }

    /// RFC 9111 §4.4: after a successful unsafe request, the target's
    /// stored responses (and those of the `Location` and `Content-Location`
    /// it names on the same authority) are stale.
    async fn invalidate_after_write(&self, target: &Target, headers: &HeaderMap) {
        let named = [header::LOCATION, header::CONTENT_LOCATION]
            .into_iter()
            .filter_map(|name| headers.get(name)?.to_str().ok().and_then(|value| target.referenced(value)));
        let mut buckets: Vec<usize> = std::iter::once(target.clone()).chain(named).map(|t| t.bucket(BUCKETS)).collect();
        buckets.sort_unstable();
        buckets.dedup();
        for bucket in buckets {
            let namespace = bucket_namespace(&self.shared.policy, bucket);
            if let Err(error) = self.cache.invalidate(&namespace).await {
                tracing::warn!(
                    target: "cache_runtime",
                    "could not invalidate the cached pages of {}{} after a write ({error}): they may be served until their TTL",
                    target.authority,
                    target.path,
                );
            }
        }
    }
}
