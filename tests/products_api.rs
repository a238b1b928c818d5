//! examples/products_api.rs over HTTP: the service as a real process on a
//! free port, a private redis-server, a real HTTP client.

mod support;

use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::{RedisServer, run};

const DEADLINE: Duration = Duration::from_secs(60);

/// The example, started as its own process; killed (by pid) on drop.
struct Service {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Service {
    fn start(redis_url: &str) -> Self {
        let binary = std::env::current_exe()
            .ok()
            .and_then(|test| Some(test.parent()?.parent()?.join("examples").join("products_api")))
            .expect("the test binary lives in target/<profile>/deps");
        let mut child = Command::new(&binary)
            .env("BIND", "127.0.0.1:0")
            .env("REDIS_URL", redis_url)
            .env_remove("DATABASE_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {} (cargo test builds examples first): {e}", binary.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("the service says where it listens");
        let base = line.trim().strip_prefix("listening on ").expect("a `listening on` line").to_owned();
        Self { child, base, http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap() }
    }

    async fn get(&self, path: &str, user: Option<&str>) -> (u16, Value) {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(user) = user {
            request = request.bearer_auth(user);
        }
        let response = request.send().await.expect("the service answers");
        (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: &str) -> (u16, Value) {
        let response = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("the service answers");
        (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
    }

    async fn db_queries(&self) -> u64 {
        self.get("/stats", None).await.1["db_queries"].as_u64().expect("db_queries in /stats")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_second_list_does_not_touch_the_database() {
    let redis = RedisServer::start();
    let service = Service::start(&redis.url());
    run(DEADLINE, async {
        let before = service.db_queries().await;
        let (status, first) = service.get("/products?category=kitchen&page=1", None).await;
        assert_eq!(status, 200);
        assert_eq!(first.as_array().map(Vec::len), Some(10));
        assert!(first[0]["tags"].is_array() && first[0]["category"] == "kitchen", "{first}");
        assert_eq!(service.db_queries().await, before + 1, "the first list reads the database");
        let (_, second) = service.get("/products?page=1&category=kitchen", None).await;
        assert_eq!(second, first);
        assert_eq!(service.db_queries().await, before + 1, "the second does not");
        let (_, page2) = service.get("/products?category=kitchen&page=2", None).await;
        assert_ne!(page2, first);
        assert_eq!(service.db_queries().await, before + 2);
    });
}

#[test]
fn writes_are_visible_at_once() {
    let redis = RedisServer::start();
    let service = Service::start(&redis.url());
    run(DEADLINE, async {
        let (_, books) = service.get("/products?category=books&page=9", None).await;
        assert_eq!(books, json!([]), "cached: an empty last page");

        let (status, created) = service
            .send(
                reqwest::Method::POST,
                "/products",
                r#"{"name": "Atlas", "price": 30.5, "category": "books", "tags": ["gift", "new"]}"#,
            )
            .await;
        assert_eq!(status, 201, "{created}");
        assert_eq!(created["name"], "Atlas");
        assert_eq!(created["tags"], json!(["gift", "new"]));
        let id = created["id"].as_i64().expect("an id");

        let (_, all_books) = service.get("/products?category=books&page=2", None).await;
        assert!(
            all_books.as_array().unwrap().iter().any(|p| p["id"] == id),
            "the list shows the new product: {all_books}"
        );
        let (_, one) = service.get(&format!("/products/{id}"), None).await;
        assert_eq!(one, created);

        let (status, updated) = service
            .send(
                reqwest::Method::PUT,
                &format!("/products/{id}"),
                r#"{"name": "Atlas", "price": 25.0, "category": "books"}"#,
            )
            .await;
        assert_eq!(status, 200, "{updated}");
        let (_, one) = service.get(&format!("/products/{id}"), None).await;
        assert_eq!(one["price"], 25.0, "the new price at once");

        let (status, _) = service.send(reqwest::Method::DELETE, &format!("/products/{id}"), "").await;
        assert_eq!(status, 204);
        let (status, error) = service.get(&format!("/products/{id}"), None).await;
        assert_eq!((status, error["error"].as_str()), (404, Some("not found")));
    });
}

#[test]
fn each_user_gets_their_own_recommendations() {
    let redis = RedisServer::start();
    let service = Service::start(&redis.url());
    run(DEADLINE, async {
        let (status, alice) = service.get("/me/recommendations", Some("alice")).await;
        assert_eq!(status, 200);
        let (_, bob) = service.get("/me/recommendations", Some("bob")).await;
        assert_ne!(alice, bob, "one user never sees another's answer");
        let queries = service.db_queries().await;
        assert_eq!(service.get("/me/recommendations", Some("alice")).await.1, alice);
        assert_eq!(service.get("/me/recommendations", Some("bob")).await.1, bob);
        assert_eq!(service.db_queries().await, queries, "both answers were cached, separately");
        let (status, error) = service.get("/me/recommendations", None).await;
        assert_eq!(status, 401);
        assert!(error["error"].is_string());
    });
}

#[test]
fn bad_requests_get_json_errors_never_500() {
    let redis = RedisServer::start();
    let service = Service::start(&redis.url());
    run(DEADLINE, async {
        for body in [r#"{"name": "#, r#"{"name": "x"}"#, r#"{"name": "", "price": 1, "category": "books"}"#, "[]"] {
            let (status, error) = service.send(reqwest::Method::POST, "/products", body).await;
            assert!(status == 400 || status == 422, "{body}: {status}");
            assert!(error["error"].is_string(), "{body}: {error}");
        }
        let (status, error) =
            service.send(reqwest::Method::POST, "/products", r#"{"name": "x", "price": 1, "category": "cars"}"#).await;
        assert_eq!(status, 422);
        assert!(error["error"].as_str().unwrap_or("").contains("cars"));
        assert_eq!(service.get("/products/424242", None).await.0, 404);
    });
}

#[test]
fn the_response_cache_layer_serves_and_invalidates_whole_responses() {
    let redis = RedisServer::start();
    let service = Service::start(&redis.url());
    run(DEADLINE, async {
        let url = format!("{}/categories", service.base);
        let first = service.http.get(&url).send().await.unwrap();
        assert_eq!(first.headers()["x-cache"], "miss");
        let first: Value = first.json().await.unwrap();
        let second = service.http.get(&url).send().await.unwrap();
        assert_eq!(second.headers()["x-cache"], "hit");
        assert_eq!(second.headers()["content-type"], "application/json");
        assert_eq!(second.json::<Value>().await.unwrap(), first);

        service
            .send(reqwest::Method::POST, "/products", r#"{"name": "Spade", "price": 9, "category": "garden"}"#)
            .await;
        let third = service.http.get(&url).send().await.unwrap();
        assert_eq!(third.headers()["x-cache"], "miss", "the write invalidated the `categories` tag");
        let third: Value = third.json().await.unwrap();
        let garden =
            |v: &Value| v.as_array().unwrap().iter().find(|c| c["name"] == "garden").unwrap()["products"].clone();
        assert_eq!(garden(&third), json!(garden(&first).as_i64().unwrap() + 1));
    });
}

#[test]
fn the_response_cache_layer_answers_conditional_requests() {
    let redis = RedisServer::start();
    let service = Service::start(&redis.url());
    run(DEADLINE, async {
        let url = format!("{}/categories", service.base);
        let first = service.http.get(&url).send().await.unwrap();
        let etag = first.headers()["etag"].to_str().unwrap().to_owned();
        let again = service.http.get(&url).header("if-none-match", &etag).send().await.unwrap();
        assert_eq!(again.status(), 304);
        assert_eq!(
            (&again.headers()["etag"], &again.headers()["x-cache"]),
            (&first.headers()["etag"], &"hit".parse().unwrap())
        );
        assert_eq!(again.text().await.unwrap(), "");

        service
            .send(reqwest::Method::POST, "/products", r#"{"name": "Rake", "price": 12, "category": "garden"}"#)
            .await;
        let changed = service.http.get(&url).header("if-none-match", &etag).send().await.unwrap();
        assert_eq!(changed.status(), 200, "a new product changes the counts, and the ETag");
        assert_ne!(changed.headers()["etag"].to_str().unwrap(), etag);
    });
}

#[test]
fn the_api_answers_with_redis_down_and_caches_again_after() {
    let mut redis = RedisServer::start();
    let service = Service::start(&redis.url());
    let (mut product_before, mut list_before) = (Value::Null, Value::Null);
    run(DEADLINE, async {
        product_before = service.get("/products/7", None).await.1;
        list_before = service.get("/products?category=outdoor", None).await.1;
        assert_eq!(product_before["id"], 7);
    });
    redis.kill();
    run(DEADLINE, async {
        for _ in 0..5 {
            let (status, product) = service.get("/products/7", None).await;
            assert_eq!((status, &product), (200, &product_before), "correct answers without Redis");
            let (status, list) = service.get("/products?category=outdoor", None).await;
            assert_eq!((status, &list), (200, &list_before));
        }
        let stats = service.get("/stats", None).await.1;
        assert!(stats["bypassed"].as_u64().unwrap_or(0) >= 10, "{stats}");
    });
    redis.restart();
    run(DEADLINE, async {
        let hits_before = service.get("/stats", None).await.1["hits"].as_u64().unwrap_or(0);
        // The breaker probes Redis again after its cool-down (1 s).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            service.get("/products/7", None).await;
            let hits = service.get("/stats", None).await.1["hits"].as_u64().unwrap_or(0);
            if hits > hits_before + 2 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "hits never resumed after Redis came back");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

#[test]
fn many_products_by_id_cost_one_query_for_the_missing_ones() {
    let redis = RedisServer::start();
    let service = Service::start(&redis.url());
    run(DEADLINE, async {
        let ids = |found: &Value| -> Vec<i64> {
            found.as_array().expect("a list").iter().map(|p| p["id"].as_i64().expect("an id")).collect()
        };
        let before = service.db_queries().await;
        let (status, first) = service.get("/products?ids=3,1,2", None).await;
        assert_eq!(status, 200, "{first}");
        assert_eq!(ids(&first), vec![3, 1, 2], "in the order asked for");
        assert_eq!(first[0]["name"], "Product 3");
        assert_eq!(service.db_queries().await, before + 1, "one query for three products");

        let (_, second) = service.get("/products?ids=2,999,4,3,4", None).await;
        assert_eq!(ids(&second), vec![2, 4, 3], "each once; 999 does not exist");
        assert_eq!(service.db_queries().await, before + 2, "one query, for 999 and 4 only");
        let (_, third) = service.get("/products?ids=999,4,1", None).await;
        assert_eq!(ids(&third), vec![4, 1]);
        assert_eq!(service.db_queries().await, before + 2, "all cached, the absent 999 too");

        // A write forgets the entry of the id it changed, and only that one.
        let (status, _) = service
            .send(reqwest::Method::PUT, "/products/4", r#"{"name": "Renamed", "price": 1.0, "category": "books"}"#)
            .await;
        assert_eq!(status, 200);
        let queries = service.db_queries().await;
        let (_, after) = service.get("/products?ids=1,4", None).await;
        assert_eq!(after[1]["name"], "Renamed");
        assert_eq!(service.db_queries().await, queries + 1);

        let (status, error) = service.get("/products?ids=1,x", None).await;
        assert_eq!(status, 422, "{error}");
        let too_many = (0..=100).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        assert_eq!(service.get(&format!("/products?ids={too_many}"), None).await.0, 422);
    });
}
