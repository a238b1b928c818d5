//! The HTTP response cache: [`CacheLayer`] and its parts.

mod body;
mod key;
mod miss;
mod rules;
mod serve;
mod stored;

use crate::{Cache, Policy};
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use rules::DEFAULT_STATUSES;
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use stored::StoredResponse;

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

/// Whole responses cached as a tower layer (cargo feature `tower`): what
/// Django's `cache_page` does, for axum, tonic or any tower service, with
/// what HTTP says about who may see a response.
///
/// - Key: the authority, the original path (before axum's `nest` strips
///   it), the query sorted by name (repeated names keep their order), and
///   the values of the request headers the response's `Vary` names
///   (learned per resource, as Django's `learn_cache_key` does), of
///   `Authorization` and `Cookie`, and of those given to
///   [`CacheLayer::vary`].
/// - Never stored: `Vary: *`, `Set-Cookie`, `Cache-Control: private`,
///   `no-store` or `no-cache`, a `206` or any status outside
///   [`CacheLayer::statuses`] (unless the response has explicit freshness
///   and RFC 9111 allows its status), a body over
///   [`CacheLayer::max_body_bytes`] or a `text/event-stream`, which stream
///   through unbuffered.
/// - A response's `s-maxage`, `max-age` or `Expires` (less its `Age`) caps
///   the policy's TTL. The client's `no-store` bypasses the cache, its
///   `no-cache` or `max-age=0` recomputes the entry
///   ([`CacheLayer::request_cache_control`]).
/// - `If-None-Match` and `If-Modified-Since` are answered with `304` from
///   the stored response, which has an `ETag` (the body's hash when the
///   handler gave none, [`CacheLayer::etag`]); a single byte `Range` with
///   `206` from it; hits carry `Age` and `x-cache: hit`.
/// - A stale entry with the service's own validators is revalidated: a
///   `304` updates its headers and freshness and keeps its body.
/// - A successful unsafe request (`POST`, `PUT`, `DELETE`, ...) through the
///   layer invalidates the cached `GET`s of its path, and of the paths its
///   `Location` and `Content-Location` name.
///
/// Namespace versions, tags, TTL and jitter, stampede protection, the
/// failure handling and compression are those of [`Cache::get_or_compute`]:
/// a stored response (its headers and body, encoded) is compressed like any
/// value, by the cache's [`compression`](crate::CacheBuilder::compression)
/// or the policy's [`compress`](crate::Policy::compress). A body that is
/// already compressed (`gzip`, images) does not shrink and is stored as is,
/// so it costs one failed attempt on the miss and nothing on a hit.
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
    ///
    /// ```
    /// # use cache_runtime::{Cache, CacheLayer, Policy};
    /// # let cache = Cache::builder().build()?;
    /// let layer = CacheLayer::new(cache, Policy::new("pages").ttl(std::time::Duration::from_secs(60)));
    /// # Ok::<(), cache_runtime::Error>(())
    /// ```
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
    ///
    /// ```
    /// # use cache_runtime::{Cache, CacheLayer, Policy};
    /// # let cache = Cache::builder().build()?;
    /// let layer = CacheLayer::new(cache, Policy::new("pages")).vary([http::header::ACCEPT_LANGUAGE]);
    /// # Ok::<(), cache_runtime::Error>(())
    /// ```
    pub fn vary(mut self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        Arc::make_mut(&mut self.settings).vary.extend(headers);
        self
    }

    /// What to do with requests that carry `Authorization` or `Cookie`
    /// (default: [`Credentials::PerValue`]).
    ///
    /// ```
    /// # use cache_runtime::{Cache, CacheLayer, Policy};
    /// # let cache = Cache::builder().build()?;
    /// let layer = CacheLayer::new(cache, Policy::new("pages")).credentials(cache_runtime::Credentials::Bypass);
    /// # Ok::<(), cache_runtime::Error>(())
    /// ```
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        Arc::make_mut(&mut self.settings).credentials = credentials;
        self
    }

    /// The statuses stored without explicit freshness (default: 200, 203,
    /// 204, 300, 301, 404, 405, 410, 414, 501). `206` is never stored.
    ///
    /// ```
    /// # use cache_runtime::{Cache, CacheLayer, Policy};
    /// # let cache = Cache::builder().build()?;
    /// // Only successes: a 404 goes to the handler every time.
    /// let layer = CacheLayer::new(cache, Policy::new("pages")).statuses([200, 203, 204]);
    /// # Ok::<(), cache_runtime::Error>(())
    /// ```
    pub fn statuses(mut self, statuses: impl IntoIterator<Item = u16>) -> Self {
        Arc::make_mut(&mut self.settings).statuses = statuses.into_iter().filter(|s| *s != 206).collect();
        self
    }

    /// Whether the client's `Cache-Control` (and `Pragma: no-cache`) is
    /// honoured: `no-store` bypasses, `no-cache` or `max-age=0` recomputes
    /// (default: true). Turn off where clients are not trusted to cost a
    /// computation.
    ///
    /// ```
    /// # use cache_runtime::{Cache, CacheLayer, Policy};
    /// # let cache = Cache::builder().build()?;
    /// let layer = CacheLayer::new(cache, Policy::new("pages")).request_cache_control(false);
    /// # Ok::<(), cache_runtime::Error>(())
    /// ```
    pub fn request_cache_control(mut self, honour: bool) -> Self {
        Arc::make_mut(&mut self.settings).request_cache_control = honour;
        self
    }

    /// Whether a stored response without an `ETag` gets one, the hash of
    /// its body (default: true).
    ///
    /// ```
    /// # use cache_runtime::{Cache, CacheLayer, Policy};
    /// # let cache = Cache::builder().build()?;
    /// let layer = CacheLayer::new(cache, Policy::new("pages")).etag(false);
    /// # Ok::<(), cache_runtime::Error>(())
    /// ```
    pub fn etag(mut self, etag: bool) -> Self {
        Arc::make_mut(&mut self.settings).etag = etag;
        self
    }

    /// The largest body stored (default: 1 MiB, the cache's default
    /// `max_value_bytes`); larger ones stream through, and so do bodies of
    /// unknown length once they pass it.
    ///
    /// ```
    /// # use cache_runtime::{Cache, CacheLayer, Policy};
    /// # let cache = Cache::builder().build()?;
    /// let layer = CacheLayer::new(cache, Policy::new("pages")).max_body_bytes(256 << 10);
    /// # Ok::<(), cache_runtime::Error>(())
    /// ```
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
///
/// ```
/// use cache_runtime::{Cache, CacheLayer, CacheService, Policy};
/// use tower_layer::Layer;
///
/// let layer = CacheLayer::new(Cache::builder().build()?, Policy::new("pages"));
/// let service: CacheService<()> = layer.layer(());
/// # Ok::<(), cache_runtime::Error>(())
/// ```
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
    /// It varies on a header the key did not include (the second field
    /// holds all its selecting headers): returned, and those headers are
    /// learned for the resource.
    Relearn(StoredResponse, Vec<HeaderName>),
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
