//! A miss, or a revalidation: the service's response, and what of it may
//! be stored.

use super::body::{self, Read};
use super::key::normalized;
use super::rules::{storable, vary_names};
use super::stored::{StoredResponse, etag_of, is_replayable, unix_ms};
use super::{Settings, Uncached, boxed};
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::SystemTime;

/// One computation of a response, for `Cache::get_or_compute` or
/// `Cache::refresh`.
pub(super) struct Miss<'a, S, ReqBody> {
    pub settings: &'a Settings,
    pub inner: &'a mut S,
    /// The request; taken by the computation that sends it.
    pub slot: &'a mut Option<Request<ReqBody>>,
    /// The request headers the key includes.
    pub names: &'a [HeaderName],
    /// Set once the service is called: the answer is not a hit.
    pub computed: &'a AtomicBool,
    /// A stale stored response to revalidate: its validators go to the
    /// service, and a `304` refreshes it.
    pub previous: Option<&'a StoredResponse>,
}

impl<S, ReqBody> Miss<'_, S, ReqBody> {
    pub(super) async fn run<ResBody>(self) -> Result<StoredResponse, Uncached<S::Error>>
    where
        S: tower_service::Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: http_body::Body<Data = Bytes> + Send + 'static,
        ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Miss { settings, inner, slot, names, computed, previous } = self;
        computed.store(true, Relaxed);
        let mut request = slot.take().ok_or(Uncached::Spent)?;
        if let Some(previous) = previous {
            previous.add_validators(request.headers_mut());
        }
        let (mut head, ()) = Request::new(()).into_parts();
        head.uri = request.uri().clone();
        // For the key of a response that varies on more than the key did.
        let response = inner.call(request).await.map_err(Uncached::Service)?;
        let now = SystemTime::now();
        let (mut parts, body) = response.into_parts();

        if let Some(previous) = previous.filter(|_| parts.status == StatusCode::NOT_MODIFIED) {
            // The stored body is current: its headers are updated, and its
            // freshness computed anew from them.
            let headers = previous.updated_by(&parts.headers);
            let mut updated = Response::new(()).into_parts().0;
            updated.status = StatusCode::from_u16(previous.status).unwrap_or(StatusCode::OK);
            for (name, value) in &headers {
                if let (Ok(name), Ok(value)) = (HeaderName::try_from(name.as_str()), HeaderValue::from_bytes(value)) {
                    updated.headers.append(name, value);
                }
            }
            if let Some(age) = parts.headers.get(header::AGE) {
                updated.headers.insert(header::AGE, age.clone());
            }
            let revalidated = storable(&head, &updated, &settings.statuses, now);
            let stored = StoredResponse {
                headers,
                stored_ms: unix_ms(now),
                initial_age: revalidated.map_or(0, |f| f.initial_age),
                fresh_until_ms: match revalidated {
                    Ok(freshness) => freshness.lifetime.map(|l| unix_ms(now).saturating_add(l.as_millis() as u64)),
                    // Not storable any more: served once, and stale at once.
                    Err(_) => Some(0),
                },
                ..previous.clone()
            };
            return Ok(stored);
        }

        let freshness = match storable(&head, &parts, &settings.statuses, now) {
            Ok(freshness) => freshness,
            Err(_) => return Err(Uncached::Response(Response::from_parts(parts, boxed(body)))),
        };
        let mut required = settings.base_names();
        required.extend(vary_names(&parts.headers).unwrap_or_default());
        let required = normalized(required);
        let declared_length =
            parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let event_stream = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
        if event_stream || declared_length.is_some_and(|length| length > settings.max_body_bytes as u64) {
            return Err(Uncached::Response(Response::from_parts(parts, boxed(body))));
        }
        let body = match body::read_within(body, settings.max_body_bytes).await {
            Ok(Read::Complete(body)) => body,
            Ok(Read::Streaming(rest)) => return Err(Uncached::Response(Response::from_parts(parts, boxed(rest)))),
            Err(error) => return Err(Uncached::Body(error.into())),
        };
        let computed_etag = settings.etag && !parts.headers.contains_key(header::ETAG);
        if computed_etag && let Ok(etag) = HeaderValue::from_str(&etag_of(&body)) {
            parts.headers.insert(header::ETAG, etag);
        }
        let headers = parts
            .headers
            .iter()
            .filter(|(name, _)| is_replayable(name, &parts.headers))
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .collect();
        let stored_ms = unix_ms(now);
        let stored = StoredResponse {
            status: parts.status.as_u16(),
            headers,
            body,
            stored_ms,
            initial_age: freshness.initial_age,
            fresh_until_ms: freshness.lifetime.map(|lifetime| stored_ms.saturating_add(lifetime.as_millis() as u64)),
            vary: required.iter().map(|name| name.as_str().to_owned()).collect(),
            computed_etag,
        };
        if !required.iter().all(|name| names.contains(name)) {
            return Err(Uncached::Relearn(stored, required));
        }
        Ok(stored)
    }
}
