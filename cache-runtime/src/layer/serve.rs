//! One request through the layer: the lookup, revalidation or
//! computation, what is learned of the resource, and the invalidation
//! after a write.

use super::key::{EntryKey, Target, normalized};
use super::miss::Miss;
use super::rules::RequestDirectives;
use super::stored::{Conditions, StoredResponse};
use super::{BUCKETS, CacheBody, CacheLayer, Credentials, Uncached, boxed, bucket_namespace, plain};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Response, StatusCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::SystemTime;

impl CacheLayer {
    pub(super) async fn serve<S, ReqBody, ResBody>(
        self,
        mut inner: S,
        mut request: Request<ReqBody>,
    ) -> Result<Response<CacheBody>, S::Error>
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
        if directives.no_store || (credentialed && settings.credentials == Credentials::Bypass) {
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
            self.cache
                .refresh(
                    policy,
                    &key,
                    Miss {
                        settings: &settings,
                        inner: &mut inner,
                        slot: &mut slot,
                        names: &names,
                        computed: &computed,
                        previous: None,
                    }
                    .run(),
                )
                .await
        } else {
            self.cache
                .get_or_compute(
                    policy,
                    &key,
                    Miss {
                        settings: &settings,
                        inner: &mut inner,
                        slot: &mut slot,
                        names: &names,
                        computed: &computed,
                        previous: None,
                    }
                    .run(),
                )
                .await
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
            let revalidate = Miss {
                settings: &settings,
                inner: &mut inner,
                slot: &mut slot,
                names: &names,
                computed: &computed,
                previous: previous.as_ref(),
            };
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
            Err(Uncached::Relearn(stored, varies)) => {
                // Not stored: its full key is not the one whose versions
                // this miss read before asking the origin, so a write that
                // returned meanwhile could not keep it out. The next
                // request computes under the full key.
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
