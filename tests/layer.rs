//! `CacheLayer`'s rules, each over a real socket: reqwest against an axum
//! app on a free loopback port, caching in a private redis-server.

mod layer_app;
mod support;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use cache_runtime::{Cache, CacheLayer, Credentials, Policy};
use layer_app::{App, Calls};
use reqwest::Method;
use std::time::Duration;
use support::{RedisServer, patient_cache, run};

const DEADLINE: Duration = Duration::from_secs(30);

fn cache(redis: &RedisServer) -> Cache {
    patient_cache(&redis.url(), "layer").build().expect("cache")
}

fn layer(cache: &Cache) -> CacheLayer {
    CacheLayer::new(cache.clone(), Policy::new("pages").ttl(Duration::from_secs(60)))
}

/// A handler that counts its calls and answers `call N` with `headers`.
fn counting(
    calls: &Calls,
    status: u16,
    headers: &'static [(&'static str, &'static str)],
) -> axum::routing::MethodRouter {
    let calls = calls.clone();
    get(move || {
        let n = calls.bump();
        async move {
            let mut response = (StatusCode::from_u16(status).unwrap(), format!("call {n}")).into_response();
            for (name, value) in headers {
                response.headers_mut().append(*name, value.parse().unwrap());
            }
            response
        }
    })
}

#[test]
fn the_key_the_query_order_and_learned_vary() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let calls = Calls::default();
        let language = |headers: HeaderMap| async move {
            let lang = headers.get(header::ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok()).unwrap_or("en").to_owned();
            ([(header::VARY, "Accept-Language")], format!("text in {lang}"))
        };
        let app = App::serve(
            Router::new()
                .route("/list", counting(&calls, 200, &[]))
                .route("/text", get(language))
                .route_layer(layer(&cache(&redis))),
        )
        .await;
        assert_eq!(app.get("/list?a=1&b=2", &[]).await.x_cache(), "miss");
        let hit = app.get("/list?b=2&a=1", &[]).await;
        assert_eq!((hit.x_cache(), hit.body.as_str()), ("hit", "call 1"), "parameters sorted by name");
        assert_eq!(app.get("/list?a=1&b=3", &[]).await.x_cache(), "miss");

        // The first French request teaches the layer the resource's Vary.
        assert_eq!(app.get("/text", &[("accept-language", "en")]).await.body, "text in en");
        assert_eq!(app.get("/text", &[("accept-language", "fr")]).await.body, "text in fr");
        let french = app.get("/text", &[("accept-language", "fr")]).await;
        assert_eq!((french.x_cache(), french.body.as_str()), ("hit", "text in fr"), "stored at once, under its Vary");
        let english = app.get("/text", &[("accept-language", "en")]).await;
        assert_eq!(english.body, "text in en");
        let french = app.get("/text", &[("accept-language", "fr")]).await;
        assert_eq!((french.x_cache(), french.body.as_str()), ("hit", "text in fr"));
        let again = app.get("/text", &[("accept-language", "en")]).await;
        assert_eq!((again.x_cache(), again.body.as_str()), ("hit", "text in en"));
    });
}

#[test]
fn what_is_never_stored() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let calls: Vec<Calls> = (0..9).map(|_| Calls::default()).collect();
        let app = App::serve(
            Router::new()
                .route("/star", counting(&calls[0], 200, &[("vary", "*")]))
                .route("/cookie", counting(&calls[1], 200, &[("set-cookie", "session=1")]))
                .route("/private", counting(&calls[2], 200, &[("cache-control", "private, max-age=60")]))
                .route("/no-store", counting(&calls[3], 200, &[("cache-control", "no-store")]))
                .route("/no-cache", counting(&calls[4], 200, &[("cache-control", "no-cache")]))
                .route("/created", counting(&calls[5], 201, &[]))
                .route("/error", counting(&calls[6], 500, &[]))
                .route("/missing", counting(&calls[7], 404, &[]))
                .route("/expired", counting(&calls[8], 200, &[("cache-control", "max-age=0")]))
                .route_layer(layer(&cache(&redis))),
        )
        .await;
        for path in ["/star", "/cookie", "/private", "/no-store", "/no-cache", "/created", "/error", "/expired"] {
            for _ in 0..2 {
                assert_ne!(app.get(path, &[]).await.x_cache(), "hit", "{path}");
            }
        }
        assert_eq!(app.get("/missing", &[]).await.status, 404);
        let missing = app.get("/missing", &[]).await;
        assert_eq!((missing.status, missing.x_cache()), (404, "hit"), "a 404 is stored, and served as a 404");
        for (i, calls) in calls.iter().enumerate() {
            let expected = if i == 7 { 1 } else { 2 };
            assert_eq!(calls.get(), expected, "route {i}");
        }
    });
}

#[test]
fn statuses_are_configurable_and_credentials_may_bypass() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache(&redis);
        let (missing, page) = (Calls::default(), Calls::default());
        let app = App::serve(
            Router::new()
                .route("/missing", counting(&missing, 404, &[]))
                .route("/page", counting(&page, 200, &[]))
                .route_layer(layer(&cache).statuses([200]).credentials(Credentials::Bypass)),
        )
        .await;
        app.get("/missing", &[]).await;
        app.get("/missing", &[]).await;
        assert_eq!(missing.get(), 2, "404 is not in the list");
        for _ in 0..2 {
            assert_eq!(app.get("/page", &[("cookie", "session=alice")]).await.x_cache(), "");
            assert_eq!(app.get("/page", &[("authorization", "Bearer bob")]).await.x_cache(), "");
        }
        assert_eq!(page.get(), 4, "requests with credentials are not cached");
        app.get("/page", &[]).await;
        assert_eq!(app.get("/page", &[]).await.x_cache(), "hit");
    });
}

#[test]
fn the_request_cache_control_bypasses_or_refreshes() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache(&redis);
        let (honoured, ignored) = (Calls::default(), Calls::default());
        let app = App::serve(
            Router::new().route("/page", counting(&honoured, 200, &[])).route_layer(layer(&cache)).merge(
                Router::new().route("/strict", counting(&ignored, 200, &[])).route_layer(
                    CacheLayer::new(cache.clone(), Policy::new("strict").ttl(Duration::from_secs(60)))
                        .request_cache_control(false),
                ),
            ),
        )
        .await;
        assert_eq!(app.get("/page", &[]).await.body, "call 1");
        let bypass = app.get("/page", &[("cache-control", "no-store")]).await;
        assert_eq!((bypass.body.as_str(), bypass.x_cache()), ("call 2", ""));
        assert_eq!(app.get("/page", &[]).await.body, "call 1", "no-store neither read nor replaced the entry");
        for (name, value) in [("cache-control", "no-cache"), ("cache-control", "max-age=0"), ("pragma", "no-cache")] {
            let fresh = app.get("/page", &[(name, value)]).await;
            assert_eq!(fresh.x_cache(), "miss", "{name}: {value}");
            let after = app.get("/page", &[]).await;
            assert_eq!((after.x_cache(), &after.body), ("hit", &fresh.body), "{name}: {value} refreshed the entry");
        }
        assert_eq!(honoured.get(), 5);

        app.get("/strict", &[]).await;
        assert_eq!(app.get("/strict", &[("cache-control", "no-cache")]).await.x_cache(), "hit");
        assert_eq!(app.get("/strict", &[("cache-control", "no-store")]).await.x_cache(), "hit");
        assert_eq!(ignored.get(), 1, "untrusted clients cannot force a computation");
    });
}

#[test]
fn the_response_freshness_caps_the_ttl_and_hits_carry_age() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let (short, shared, long) = (Calls::default(), Calls::default(), Calls::default());
        let app = App::serve(
            Router::new()
                .route("/short", counting(&short, 200, &[("cache-control", "max-age=1")]))
                .route("/shared", counting(&shared, 200, &[("cache-control", "max-age=600, s-maxage=1")]))
                .route("/long", counting(&long, 200, &[]))
                .route_layer(layer(&cache(&redis))),
        )
        .await;
        for path in ["/short", "/shared", "/long"] {
            app.get(path, &[]).await;
            assert_eq!(app.get(path, &[]).await.x_cache(), "hit", "{path}");
        }
        tokio::time::sleep(Duration::from_millis(2100)).await;
        for path in ["/short", "/shared"] {
            let after = app.get(path, &[]).await;
            assert_eq!((after.x_cache(), after.body.as_str()), ("miss", "call 2"), "{path} outlived its max-age");
        }
        let long_hit = app.get("/long", &[]).await;
        assert_eq!(long_hit.x_cache(), "hit", "the policy TTL applies without max-age");
        let age: u64 = long_hit.header("age").parse().expect("an Age on a hit");
        assert!((2..=3).contains(&age), "age {age}");
        let after_max_age = app.get("/long", &[("cache-control", "max-age=1")]).await;
        assert_eq!(after_max_age.x_cache(), "miss", "older than the client accepts");
    });
}

#[test]
fn conditional_requests_get_304_on_hits_and_misses() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache(&redis);
        let (plain, tagged, dated) = (Calls::default(), Calls::default(), Calls::default());
        let app = App::serve(
            Router::new()
                .route("/plain", counting(&plain, 200, &[]))
                .route("/tagged", counting(&tagged, 200, &[("etag", "W/\"v1\"")]))
                .route("/dated", counting(&dated, 200, &[("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT")]))
                .route_layer(layer(&cache))
                .merge(Router::new().route("/untagged", get(|| async { "body" })).route_layer(
                    CacheLayer::new(cache.clone(), Policy::new("untagged").ttl(Duration::from_secs(60))).etag(false),
                )),
        )
        .await;
        let first = app.get("/plain", &[]).await;
        let etag = first.header("etag").to_owned();
        assert!(etag.starts_with('"') && etag.len() > 10, "a strong ETag from the body: {etag}");
        let not_modified = app.get("/plain", &[("if-none-match", &etag)]).await;
        assert_eq!((not_modified.status, not_modified.x_cache(), not_modified.body.as_str()), (304, "hit", ""));
        assert_eq!(not_modified.header("etag"), etag);
        let changed = app.get("/plain", &[("if-none-match", "\"other\"")]).await;
        assert_eq!((changed.status, changed.body.as_str()), (200, "call 1"));

        // A miss answers the condition too: the handler's ETag is known.
        let miss = app.get("/tagged", &[("if-none-match", "\"v1\"")]).await;
        assert_eq!((miss.status, miss.x_cache()), (304, "miss"));
        assert_eq!(app.get("/tagged", &[]).await.body, "call 1", "the miss stored the whole response");
        let since = app.get("/dated", &[("if-modified-since", "Tue, 01 Dec 2026 11:00:00 GMT")]).await;
        assert_eq!((since.status, since.x_cache()), (304, "miss"));
        let before = app.get("/dated", &[("if-modified-since", "Mon, 30 Nov 2026 11:00:00 GMT")]).await;
        assert_eq!((before.status, before.x_cache()), (200, "hit"));

        let untagged = app.get("/untagged", &[]).await;
        assert_eq!(untagged.header("etag"), "", ".etag(false)");
    });
}

#[test]
fn bodies_over_the_limit_and_event_streams_are_not_stored() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let (big, events) = (Calls::default(), Calls::default());
        let big_calls = big.clone();
        let event_calls = events.clone();
        let app = App::serve(
            Router::new()
                .route(
                    "/big",
                    get(move || {
                        big_calls.bump();
                        async { "x".repeat(2000) }
                    }),
                )
                .route(
                    "/events",
                    get(move || {
                        event_calls.bump();
                        async { ([(header::CONTENT_TYPE, "text/event-stream")], "data: 1\n\n") }
                    }),
                )
                .route("/small", get(|| async { "x".repeat(1000) }))
                .route_layer(layer(&cache(&redis)).max_body_bytes(1000)),
        )
        .await;
        for _ in 0..2 {
            assert_eq!(app.get("/big", &[]).await.body.len(), 2000);
            assert_eq!(app.get("/events", &[]).await.body, "data: 1\n\n");
        }
        assert_eq!((big.get(), events.get()), (2, 2));
        app.get("/small", &[]).await;
        assert_eq!(app.get("/small", &[]).await.x_cache(), "hit", "at the limit is stored");
    });
}

#[test]
fn a_successful_write_invalidates_the_path_and_its_location() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let (items, item) = (Calls::default(), Calls::default());
        let write = |status: u16, location: Option<&'static str>| {
            move || async move {
                let mut response = StatusCode::from_u16(status).unwrap().into_response();
                if let Some(location) = location {
                    response.headers_mut().insert(header::LOCATION, location.parse().unwrap());
                }
                response
            }
        };
        let app = App::serve(
            Router::new()
                .route("/items", counting(&items, 200, &[]).post(write(201, Some("/items/7"))).put(write(500, None)))
                .route("/items/7", counting(&item, 200, &[]).delete(write(204, None)))
                .route_layer(layer(&cache(&redis))),
        )
        .await;
        app.get("/items?page=2", &[]).await;
        app.get("/items/7", &[]).await;
        assert_eq!(app.send(Method::PUT, "/items", &[]).await.status, 500);
        assert_eq!(app.get("/items?page=2", &[]).await.x_cache(), "hit", "a failed write invalidates nothing");
        assert_eq!(app.send(Method::POST, "/items", &[]).await.status, 201);
        assert_eq!(app.get("/items?page=2", &[]).await.x_cache(), "miss", "every query of the path");
        assert_eq!(app.get("/items/7", &[]).await.x_cache(), "miss", "the Location it names");
        assert_eq!(app.get("/items/7", &[]).await.x_cache(), "hit");
        assert_eq!(app.send(Method::DELETE, "/items/7", &[]).await.status, 204);
        assert_eq!(app.get("/items/7", &[]).await.x_cache(), "miss");
        assert_eq!((items.get(), item.get()), (2, 3));
    });
}

#[test]
fn clearing_the_cache_clears_the_layers_pages() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let (items, item) = (Calls::default(), Calls::default());
        let cache = cache(&redis);
        let app = App::serve(
            Router::new()
                .route("/items", counting(&items, 200, &[]))
                .route("/items/7", counting(&item, 200, &[]))
                .route_layer(layer(&cache)),
        )
        .await;
        for path in ["/items", "/items/7"] {
            assert_eq!(app.get(path, &[]).await.x_cache(), "miss");
            assert_eq!(app.get(path, &[]).await.x_cache(), "hit");
        }
        cache.clear().await.expect("clear");
        for path in ["/items", "/items/7"] {
            let page = app.get(path, &[]).await;
            assert_eq!((page.x_cache(), page.body.as_str()), ("miss", "call 2"), "{path} after the clear");
        }
        assert_eq!(app.get("/items", &[]).await.x_cache(), "hit");
    });
}

#[test]
fn stale_entries_are_revalidated_and_updated_from_a_304() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let calls = Calls::default();
        let origin = calls.clone();
        let page = move |headers: HeaderMap| {
            let n = origin.bump();
            async move {
                let current = headers.get(header::IF_NONE_MATCH).is_some_and(|tag| tag == "\"v1\"");
                let status = if current { StatusCode::NOT_MODIFIED } else { StatusCode::OK };
                let version = n.to_string();
                let headers =
                    [("etag", "\"v1\"".to_owned()), ("cache-control", "max-age=1".to_owned()), ("x-version", version)];
                (status, headers, if current { "" } else { "payload" }).into_response()
            }
        };
        let app = App::serve(Router::new().route("/page", get(page)).route_layer(layer(&cache(&redis)))).await;
        let first = app.get("/page", &[]).await;
        assert_eq!((first.body.as_str(), first.header("x-version")), ("payload", "1"));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let revalidated = app.get("/page", &[]).await;
        assert_eq!((revalidated.status, revalidated.body.as_str()), (200, "payload"), "the stored body, still current");
        assert_eq!(revalidated.header("x-version"), "2", "headers updated from the 304");
        let hit = app.get("/page", &[]).await;
        assert_eq!((hit.x_cache(), hit.header("x-version")), ("hit", "2"), "fresh again for its new max-age");
        assert_eq!(calls.get(), 2);
    });
}

#[test]
fn an_age_that_is_not_one_integer_makes_a_response_stale() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let (odd, fine) = (Calls::default(), Calls::default());
        let app = App::serve(
            Router::new()
                .route("/odd", counting(&odd, 200, &[("cache-control", "max-age=60"), ("age", "7200.0")]))
                .route("/fine", counting(&fine, 200, &[("cache-control", "max-age=60"), ("age", "30")]))
                .route_layer(layer(&cache(&redis))),
        )
        .await;
        for _ in 0..2 {
            app.get("/odd", &[]).await;
            app.get("/fine", &[]).await;
        }
        assert_eq!((odd.get(), fine.get()), (2, 1));
        let age: u64 = app.get("/fine", &[]).await.header("age").parse().expect("an Age");
        assert!(age >= 30, "the age it arrived with counts: {age}");
    });
}

#[test]
fn a_range_is_served_from_the_stored_whole_response() {
    let redis = RedisServer::start();
    run(DEADLINE, async {
        let app =
            App::serve(Router::new().route("/file", get(|| async { "0123456789" })).route_layer(layer(&cache(&redis))))
                .await;
        assert_eq!(app.get("/file", &[]).await.body, "0123456789");
        let part = app.get("/file", &[("range", "bytes=2-4")]).await;
        assert_eq!((part.status, part.body.as_str(), part.x_cache()), (206, "234", "hit"));
        assert_eq!(part.header("content-range"), "bytes 2-4/10");
        let several = app.get("/file", &[("range", "bytes=0-1,4-5")]).await;
        assert_eq!((several.status, several.body.as_str()), (200, "0123456789"), "several ranges: the whole");
    });
}
