//! An axum app wrapped in `CacheLayer`, served on a free loopback port in
//! the test's runtime, and a real HTTP client for it.

#![allow(dead_code)]

use axum::Router;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

/// The app's address and a client.
pub struct App {
    pub base: String,
    pub http: reqwest::Client,
}

/// What came back.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    pub fn x_cache(&self) -> &str {
        self.header("x-cache")
    }
}

impl App {
    /// Serves `router` on 127.0.0.1, port chosen by the kernel.
    pub async fn serve(router: Router) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free loopback port");
        let base = format!("http://{}", listener.local_addr().expect("bound"));
        tokio::spawn(async move { axum::serve(listener, router).await });
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
        Self { base, http }
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(reqwest::Method::GET, path, headers).await
    }

    pub async fn send(&self, method: reqwest::Method, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("the app answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.text().await.expect("a body");
        Reply { status, headers, body }
    }
}

/// Counts a handler's calls.
#[derive(Clone, Default)]
pub struct Calls(Arc<AtomicUsize>);

impl Calls {
    pub fn bump(&self) -> usize {
        self.0.fetch_add(1, SeqCst) + 1
    }

    pub fn get(&self) -> usize {
        self.0.load(SeqCst)
    }
}
