//! A reverse proxy whose router is wrapped in `CacheLayer`: what the
//! public HTTP cache test suite (`http-cache-tests`, cache-tests.fyi)
//! drives, as it drives nginx and Varnish. `scripts/http-cache-tests.sh`
//! runs it.
//!
//! ```text
//! ORIGIN=http://127.0.0.1:8000 cargo run --example http_cache_proxy
//! ```
//!
//! Configuration from the environment: `ORIGIN` (required), `BIND`
//! (default `127.0.0.1:0`; the address is printed), `REDIS_URL` (default:
//! a memory-only cache), `TTL_SECS` (the policy TTL, default 3600).
//!
//! The proxy forwards every request as it came, less the hop-by-hop
//! fields (RFC 9110 §7.6.1), and adds nothing.

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use cache_runtime::{Cache, CacheLayer, Policy};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

#[derive(Clone)]
struct Upstream {
    origin: String,
    client: Client<HttpConnector, Body>,
}

/// Removes the fields that describe one connection, and those the
/// `Connection` field names.
fn drop_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"] {
        headers.remove(name);
    }
}

async fn forward(State(upstream): State<Upstream>, mut request: Request) -> Response {
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("{}{path}", upstream.origin).parse::<Uri>() else {
        return (StatusCode::BAD_REQUEST, "bad request target").into_response();
    };
    *request.uri_mut() = uri;
    drop_hop_by_hop(request.headers_mut());
    match upstream.client.request(request).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            drop_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        Err(error) => {
            eprintln!("origin unreachable: {error:?}");
            (StatusCode::BAD_GATEWAY, format!("origin unreachable: {error}")).into_response()
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let origin = std::env::var("ORIGIN").map_err(|_| "set ORIGIN, e.g. ORIGIN=http://127.0.0.1:8000")?;
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:0".to_owned());
    let ttl = std::env::var("TTL_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3600);
    let cache = match std::env::var("REDIS_URL") {
        Ok(url) => Cache::builder().url(&url).key_prefix("http-cache-proxy").build()?,
        Err(_) => Cache::builder().build()?,
    };
    let upstream = Upstream {
        origin: origin.trim_end_matches('/').to_owned(),
        // A fresh connection per request: a pooled one the origin has just
        // closed (node's 5 s keep-alive) would fail the request.
        client: Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build_http(),
    };
    let policy = Policy::new("proxy").ttl(Duration::from_secs(ttl));
    let app = Router::new().fallback(forward).with_state(upstream).layer(CacheLayer::new(cache, policy));
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
