//! The ways `CacheLayer` served the wrong response (or none), each
//! reproduced through an axum app over a real socket. Only `CacheLayer::new` and
//! `.vary` are used, so that this file also runs against the layer before
//! the fix (where every test here fails).

mod layer_app;
mod support;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::IntoResponse;
use axum::routing::get;
use cache_runtime::{Cache, CacheLayer, Policy};
use layer_app::{App, Calls};
use std::time::Duration;
use support::{RedisServer, patient_cache, run};

const DEADLINE: Duration = Duration::from_secs(30);

fn cache(redis: &RedisServer) -> Cache {
    patient_cache(&redis.url(), "layer").build().expect("cache")
}

fn layer(cache: &Cache) -> CacheLayer {
    CacheLayer::new(cache.clone(), Policy::new("pages").ttl(Duration::from_secs(60)))
}

fn cookie(headers: &HeaderMap) -> String {
    headers.get(header::COOKIE).and_then(|v| v.to_str().ok()).unwrap_or("none").to_owned()
}

/// Broken case 1: A session page says `Vary: Cookie`, as session middleware does.
#[test]
fn a_response_that_varies_on_cookie_is_never_served_to_another_session() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let page = |headers: HeaderMap| async move {
            ([(header::VARY, "Cookie")], format!("the page of {}", cookie(&headers)))
        };
        let app = App::serve(Router::new().route("/account", get(page)).route_layer(layer(&cache(&redis)))).await;
        let alice = app.get("/account", &[("cookie", "session=alice")]).await;
        assert_eq!(alice.body, "the page of session=alice");
        let bob = app.get("/account", &[("cookie", "session=bob")]).await;
        assert_eq!(bob.body, "the page of session=bob", "x-cache: {}", bob.x_cache());
        assert_eq!(app.get("/account", &[("cookie", "session=alice")]).await.x_cache(), "hit");
    });
}

/// Broken case 2: Cookie sessions without `Vary`; `.vary` adding to the defaults; every
/// value of a header.
#[test]
fn credentials_are_in_the_key_by_default_and_vary_adds_to_them() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache(&redis);
        let hello = |headers: HeaderMap| async move { format!("hello {}", cookie(&headers)) };
        let bearer = |headers: HeaderMap| async move {
            let who = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("anonymous");
            format!("the orders of {who}")
        };
        let languages = |headers: HeaderMap| async move {
            let all: Vec<&str> =
                headers.get_all(header::ACCEPT_LANGUAGE).iter().filter_map(|v| v.to_str().ok()).collect();
            format!("in {}", all.join(" then "))
        };
        let app = App::serve(
            Router::new()
                .route("/hello", get(hello))
                .route("/orders", get(bearer))
                .route("/text", get(languages))
                .route_layer(layer(&cache).vary([header::ACCEPT_LANGUAGE])),
        )
        .await;
        app.get("/hello", &[("cookie", "session=alice")]).await;
        let bob = app.get("/hello", &[("cookie", "session=bob")]).await;
        assert_eq!(bob.body, "hello session=bob", "x-cache: {}", bob.x_cache());

        app.get("/orders", &[("authorization", "Bearer alice")]).await;
        let bob = app.get("/orders", &[("authorization", "Bearer bob")]).await;
        assert_eq!(bob.body, "the orders of Bearer bob", ".vary(...) kept Authorization in the key");

        app.get("/text", &[("accept-language", "en"), ("accept-language", "fr")]).await;
        let german = app.get("/text", &[("accept-language", "en"), ("accept-language", "de")]).await;
        assert_eq!(german.body, "in en then de", "every value of a header is in the key");
    });
}

/// Broken case 3: Virtual hosts, and the prefix axum's `nest` strips.
#[test]
fn the_host_and_the_original_path_are_in_the_key() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache(&redis);
        let tenant = |headers: HeaderMap| async move {
            format!("the shop of {}", headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or(""))
        };
        let v1 = Router::new().route("/items", get(|| async { "items, v1" })).route_layer(layer(&cache));
        let v2 = Router::new().route("/items", get(|| async { "items, v2" })).route_layer(layer(&cache));
        let app = App::serve(
            Router::new().route("/shop", get(tenant)).route_layer(layer(&cache)).nest("/v1", v1).nest("/v2", v2),
        )
        .await;
        assert_eq!(app.get("/shop", &[("host", "a.example")]).await.body, "the shop of a.example");
        assert_eq!(app.get("/shop", &[("host", "b.example")]).await.body, "the shop of b.example");
        assert_eq!(app.get("/v1/items", &[]).await.body, "items, v1");
        assert_eq!(app.get("/v2/items", &[]).await.body, "items, v2");
    });
}

/// Broken case 4: A `206 Partial Content` is not the resource.
#[test]
fn a_partial_response_is_never_served_as_the_whole() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let file = |headers: HeaderMap| async move {
            match headers.get(header::RANGE) {
                Some(_) => {
                    (StatusCode::PARTIAL_CONTENT, [(header::CONTENT_RANGE, "bytes 0-3/10")], "0123").into_response()
                }
                None => "0123456789".into_response(),
            }
        };
        let app = App::serve(Router::new().route("/file", get(file)).route_layer(layer(&cache(&redis)))).await;
        let part = app.get("/file", &[("range", "bytes=0-3")]).await;
        assert_eq!((part.status, part.body.as_str()), (206, "0123"));
        let whole = app.get("/file", &[]).await;
        assert_eq!((whole.status, whole.body.as_str()), (200, "0123456789"));
    });
}

/// Broken case 5: Repeated query parameters are an ordered list to many frameworks.
#[test]
fn repeated_query_parameters_keep_their_order_in_the_key() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let echo = |uri: Uri| async move { format!("sorted by {}", uri.query().unwrap_or("")) };
        let app = App::serve(Router::new().route("/search", get(echo)).route_layer(layer(&cache(&redis)))).await;
        assert_eq!(app.get("/search?s=a&s=b", &[]).await.body, "sorted by s=a&s=b");
        assert_eq!(app.get("/search?s=b&s=a", &[]).await.body, "sorted by s=b&s=a");
        let reordered = app.get("/search?x=1&s=a&s=b", &[]).await;
        assert_eq!(reordered.body, "sorted by x=1&s=a&s=b");
        assert_eq!(app.get("/search?s=a&x=1&s=b", &[]).await.x_cache(), "hit", "other names still sort");
    });
}

/// A body whose first `before` chunks of 64 KiB come at once, and the rest
/// only after `release` fires: a layer that buffers it never answers.
fn held_body(before: usize, after: usize, release: tokio::sync::oneshot::Receiver<()>) -> Body {
    let chunk = bytes::Bytes::from(vec![b'x'; 64 << 10]);
    let stream = futures_util::stream::unfold((0usize, Some(release)), move |(sent, mut release)| {
        let chunk = chunk.clone();
        async move {
            if sent == before
                && let Some(release) = release.take()
            {
                let _ = release.await;
            }
            (sent < before + after).then(|| (Ok::<_, std::io::Error>(chunk), (sent + 1, release)))
        }
    });
    Body::from_stream(stream)
}

/// Broken case 6: Large downloads and event streams go through as they are produced.
#[test]
fn large_bodies_and_event_streams_are_streamed_not_buffered() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let (release_download, download_held) = tokio::sync::oneshot::channel();
        let (release_events, events_held) = tokio::sync::oneshot::channel::<()>();
        let download = std::sync::Arc::new(std::sync::Mutex::new(Some(download_held)));
        let events = std::sync::Arc::new(std::sync::Mutex::new(Some(events_held)));
        let calls = Calls::default();
        let app = App::serve(
            Router::new()
                .route(
                    "/download",
                    get(move || {
                        let held = download.lock().unwrap().take();
                        async move {
                            let held = held.unwrap_or_else(|| tokio::sync::oneshot::channel().1);
                            // 2 MiB at once, then 1 MiB after the client has seen bytes.
                            held_body(32, 16, held)
                        }
                    }),
                )
                .route(
                    "/events",
                    get(move || {
                        calls.bump();
                        let held = events.lock().unwrap().take();
                        async move {
                            let held = held.unwrap_or_else(|| tokio::sync::oneshot::channel().1);
                            ([(header::CONTENT_TYPE, "text/event-stream")], held_body(1, 0, held))
                        }
                    }),
                )
                .route_layer(layer(&cache(&redis))),
        )
        .await;
        let mut response = app.http.get(format!("{}/download", app.base)).send().await.expect("headers");
        let first = tokio::time::timeout(Duration::from_secs(5), response.chunk()).await;
        assert!(matches!(first, Ok(Ok(Some(_)))), "the first bytes arrive before the body is complete");
        let _ = release_download.send(());
        let mut total = first.map_or(0, |chunk| chunk.ok().flatten().map_or(0, |c| c.len()));
        while let Some(chunk) = response.chunk().await.expect("the rest") {
            total += chunk.len();
        }
        assert_eq!(total, 48 << 16);

        let mut stream = app.http.get(format!("{}/events", app.base)).send().await.expect("headers");
        let event = tokio::time::timeout(Duration::from_secs(5), stream.chunk()).await;
        assert!(matches!(event, Ok(Ok(Some(_)))), "an open event stream delivers its first event");
        drop(release_events);
    });
}

/// Broken case 7: an origin's `Age: 18446744073709551615` on a 200
/// without explicit freshness was stored with that initial age; a hit a
/// second later added the time since, which overflowed: the layer panicked
/// (debug, or any build with overflow checks) and the client got no
/// answer; in release it wrapped and the hit claimed `Age: 0`.
#[test]
fn a_huge_age_from_the_origin_neither_panics_nor_wraps_on_a_hit() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let calls = Calls::default();
        let handler = {
            let calls = calls.clone();
            get(move || {
                let n = calls.bump();
                async move {
                    let mut response = (StatusCode::OK, format!("call {n}")).into_response();
                    response.headers_mut().insert("age", "18446744073709551615".parse().unwrap());
                    response
                }
            })
        };
        let app = App::serve(Router::new().route("/old", handler).route_layer(layer(&cache(&redis)))).await;
        let first = app.get("/old", &[]).await;
        assert_eq!(first.status, 200);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let request = app.http.get(format!("{}/old", app.base)).send().await;
        let reply = request.expect("the layer answers a hit instead of panicking");
        let age: u64 = reply.headers()["age"].to_str().unwrap().parse().unwrap();
        assert!(age >= u64::MAX / 2, "a hit's Age must not wrap round: {age}");
    });
}

/// Broken case 8: a response that taught the layer a new `Vary` was not
/// stored by the miss's own store (checked against the versions read
/// before the origin ran) but by a second write-through, whose versions
/// were read only then. A POST that returned while the origin was
/// computing had bumped the path's namespace; the write-through bound the
/// older response to the new version, and every later GET was served a
/// page older than the completed write. Now such a response is returned,
/// not stored.
#[test]
fn a_relearned_vary_does_not_store_a_response_older_than_a_completed_write() {
    use axum::routing::post;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let db = Arc::new(AtomicU32::new(1));
        let (read, gate) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Semaphore::new(0)));
        let calls = Calls::default();
        let page = {
            let (db, read, gate, calls) = (db.clone(), read.clone(), gate.clone(), calls.clone());
            get(move || {
                let (db, read, gate, n) = (db.clone(), read.clone(), gate.clone(), calls.bump());
                async move {
                    let value = db.load(SeqCst);
                    if n == 1 {
                        // The first computation read the data; hold it
                        // until the write below has returned.
                        read.notify_one();
                        let _ = gate.acquire().await;
                    }
                    ([("vary", "x-tenant")], format!("value {value}")).into_response()
                }
            })
        };
        let write = {
            let db = db.clone();
            post(move || {
                db.store(2, SeqCst);
                async { StatusCode::NO_CONTENT }
            })
        };
        let app = App::serve(Router::new().route("/r", page.merge(write)).route_layer(layer(&cache(&redis)))).await;
        let (http, url) = (app.http.clone(), format!("{}/r", app.base));
        let first = tokio::spawn({
            let (http, url) = (http.clone(), url.clone());
            async move { http.get(url).header("x-tenant", "a").send().await.unwrap().text().await.unwrap() }
        });
        read.notified().await;
        let written = http.post(&url).send().await.unwrap();
        assert_eq!(written.status().as_u16(), 204, "the write returned");
        gate.add_permits(1);
        assert_eq!(first.await.unwrap(), "value 1", "the call in flight during the write");
        let after = app.get("/r", &[("x-tenant", "a")]).await;
        assert_eq!(after.body, "value 2", "served after the write returned (x-cache {})", after.x_cache());
    });
}

/// Broken case 9: the resource and its invalidation bucket were keyed by
/// the authority as sent: `app.test` and `app.test:80` name the same
/// origin (RFC 9110 §4.2.3), yet a write sent with one did not invalidate
/// the pages cached under the other.
#[test]
fn a_write_invalidates_the_pages_of_its_origin_whatever_the_default_port() {
    use axum::routing::post;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let db = Arc::new(AtomicU32::new(1));
        let read = {
            let db = db.clone();
            get(move || {
                let value = db.load(SeqCst);
                async move { format!("value {value}") }
            })
        };
        let write = {
            let db = db.clone();
            post(move || {
                db.store(2, SeqCst);
                async { StatusCode::NO_CONTENT }
            })
        };
        let app = App::serve(Router::new().route("/p", read.merge(write)).route_layer(layer(&cache(&redis)))).await;
        assert_eq!(app.get("/p", &[("host", "app.test")]).await.body, "value 1");
        assert_eq!(app.get("/p", &[("host", "app.test")]).await.x_cache(), "hit");
        let written = app.send(reqwest::Method::POST, "/p", &[("host", "app.test:80")]).await;
        assert_eq!(written.status, 204, "the write returned");
        let after = app.get("/p", &[("host", "app.test")]).await;
        assert_eq!(after.body, "value 2", "served after the write returned (x-cache {})", after.x_cache());
    });
}
