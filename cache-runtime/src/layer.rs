//! Whole responses cached as a tower layer (cargo feature `tower`): what
//! Django's `cache_page` does, for axum, tonic or any tower service.
//!
//! Only `GET` requests are cached, keyed by the path, the query string with
//! its parameters sorted, and the values of the `vary` headers
//! (`Authorization` by default, so one user's response never reaches
//! another). Only successful responses are stored, and never one that sets
//! a cookie or says `Cache-Control: private` or `no-store`. Keys, namespace
//! versions, TTL and jitter, stampede protection and the failure handling
//! are those of [`Cache::get_or_compute`].

use crate::{Cache, Policy};
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::task::{Context, Poll};

/// The body of responses that pass through a [`CacheService`].
pub type CacheBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Caches whole `GET` responses of the services it wraps.
///
/// ```
/// use cache_runtime::{Cache, CacheLayer, Policy};
/// use std::time::Duration;
///
/// let cache = Cache::builder().url("redis://127.0.0.1:6379").build()?;
/// let layer = CacheLayer::new(cache, Policy::new("pages").ttl(Duration::from_secs(30)).tags(["products"]))
///     .vary([http::header::AUTHORIZATION, http::header::ACCEPT_LANGUAGE]);
/// // axum: Router::new().route("/products", get(list)).route_layer(layer)
/// # Ok::<(), cache_runtime::Error>(())
/// ```
#[derive(Clone)]
pub struct CacheLayer {
    cache: Cache,
    policy: Arc<Policy>,
    vary: Arc<[HeaderName]>,
}

impl CacheLayer {
    /// Caches responses under `policy` (its prefix, tags, TTL, jitter),
    /// varying on `Authorization`.
    pub fn new(cache: Cache, policy: Policy) -> Self {
        Self { cache, policy: Arc::new(policy), vary: Arc::new([header::AUTHORIZATION]) }
    }

    /// The request headers whose values are part of the key (replacing the
    /// default, `Authorization`).
    pub fn vary(mut self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        self.vary = headers.into_iter().collect();
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

/// What identifies a cached response.
#[derive(Serialize)]
struct RequestKey {
    path: String,
    query: Vec<(String, String)>,
    vary: Vec<Option<Vec<u8>>>,
}

impl RequestKey {
    fn of<B>(request: &Request<B>, vary: &[HeaderName]) -> Self {
        let mut query: Vec<(String, String)> = request
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (name.to_owned(), value.to_owned())
            })
            .collect();
        query.sort();
        let vary = vary.iter().map(|name| request.headers().get(name).map(|v| v.as_bytes().to_vec())).collect();
        Self { path: request.uri().path().to_owned(), query, vary }
    }
}

/// A response as stored: status, end-to-end headers, body.
#[derive(Serialize, Deserialize)]
struct StoredResponse {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// Headers that describe one connection or one encoding of the body, not
/// the response: recomputed, never replayed.
fn is_replayable(name: &HeaderName) -> bool {
    ![header::CONNECTION, header::TRANSFER_ENCODING, header::CONTENT_LENGTH, header::SET_COOKIE].contains(name)
        && name.as_str() != "keep-alive"
}

fn may_store<B>(response: &Response<B>) -> bool {
    let private = response.headers().get_all(header::CACHE_CONTROL).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',').any(|d| matches!(d.trim().to_ascii_lowercase().as_str(), "private" | "no-store"))
        })
    });
    response.status().is_success() && !private && !response.headers().contains_key(header::SET_COOKIE)
}

impl StoredResponse {
    fn into_response(self, outcome: &'static str) -> Response<CacheBody> {
        let mut response = Response::new(boxed(Full::new(Bytes::from(self.body))));
        *response.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        for (name, value) in self.headers {
            if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::from_bytes(&value)) {
                response.headers_mut().append(name, value);
            }
        }
        response.headers_mut().insert("x-cache", HeaderValue::from_static(outcome));
        response
    }
}

fn boxed<B>(body: B) -> CacheBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// Why a response was not stored.
enum Uncached<E> {
    /// Not cacheable (an error status, a cookie, `private`): returned as is.
    Response(Response<CacheBody>),
    /// The inner service failed.
    Service(E),
    /// The body failed while it was being read.
    Body(Box<dyn std::error::Error + Send + Sync>),
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
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if request.method() != Method::GET {
            return Box::pin(async move { inner.call(request).await.map(|response| response.map(boxed)) });
        }
        let key = RequestKey::of(&request, &self.layer.vary);
        let (cache, policy) = (self.layer.cache.clone(), self.layer.policy.clone());
        Box::pin(async move {
            let computed = AtomicBool::new(false);
            let stored = cache
                .get_or_compute(&policy, &key, async {
                    computed.store(true, Relaxed);
                    let response = inner.call(request).await.map_err(Uncached::Service)?;
                    if !may_store(&response) {
                        return Err(Uncached::Response(response.map(boxed)));
                    }
                    let (parts, body) = response.into_parts();
                    let body = body.collect().await.map_err(|e| Uncached::Body(e.into()))?.to_bytes();
                    let headers = parts
                        .headers
                        .iter()
                        .filter(|(name, _)| is_replayable(name))
                        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
                        .collect();
                    Ok(StoredResponse { status: parts.status.as_u16(), headers, body: body.to_vec() })
                })
                .await;
            let outcome = if computed.load(Relaxed) { "miss" } else { "hit" };
            match stored {
                Ok(stored) => Ok(stored.into_response(outcome)),
                Err(Uncached::Response(response)) => Ok(response),
                Err(Uncached::Service(error)) => Err(error),
                Err(Uncached::Body(error)) => {
                    let mut response = Response::new(boxed(Full::new(Bytes::from(error.to_string()))));
                    *response.status_mut() = StatusCode::BAD_GATEWAY;
                    Ok(response)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_order_does_not_change_the_key() {
        let request = |uri: &str| Request::get(uri).header("authorization", "Bearer alice").body(()).unwrap();
        let vary = [header::AUTHORIZATION];
        let hash = |r: &Request<()>| {
            let mut hasher = crate::keys::KeyHasher::new("t", 1);
            hasher.arg(&RequestKey::of(r, &vary)).unwrap();
            hasher.finish()
        };
        assert_eq!(hash(&request("/p?a=1&b=2")), hash(&request("/p?b=2&a=1")));
        assert_ne!(hash(&request("/p?a=1")), hash(&request("/p?a=2")));
        let bob = Request::get("/p?a=1").header("authorization", "Bearer bob").body(()).unwrap();
        assert_ne!(hash(&request("/p?a=1")), hash(&bob), "Authorization varies the key");
    }

    #[test]
    fn private_and_cookie_responses_are_not_stored() {
        let ok = Response::new(());
        assert!(may_store(&ok));
        let private = Response::builder().header("cache-control", "max-age=60, Private").body(()).unwrap();
        assert!(!may_store(&private));
        let cookie = Response::builder().header("set-cookie", "session=1").body(()).unwrap();
        assert!(!may_store(&cookie));
        let missing = Response::builder().status(404).body(()).unwrap();
        assert!(!may_store(&missing));
    }
}
