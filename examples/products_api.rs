//! A products API: axum over SQLite (sqlx), cached in Redis.
//!
//! ```text
//! cargo run --example products_api
//! curl -s localhost:3000/products?category=kitchen
//! curl -s 'localhost:3000/products?ids=3,1,99'     # many by id: one query for the ones not cached
//! curl -si localhost:3000/categories               # x-cache: miss, then hit; an ETag
//! curl -si -H 'If-None-Match: "<that etag>"' localhost:3000/categories   # 304 Not Modified
//! ```
//!
//! Configuration from the environment: `BIND` (default `127.0.0.1:3000`),
//! `REDIS_URL` (default `redis://127.0.0.1:6379`), `DATABASE_URL` (default:
//! a fresh SQLite database, seeded at start). The demo bearer token is the
//! user's name: `Authorization: Bearer alice`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cache_runtime::{Cache, CacheLayer, Policy, cached};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{Row, SqliteConnection};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

#[derive(Clone)]
struct AppState {
    db: SqlitePool,
    cache: Cache,
    /// SQL statements run, so anyone can see what the cache saved.
    queries: Arc<AtomicU64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Product {
    id: i64,
    name: String,
    price: f64,
    category: String,
    tags: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct NewProduct {
    name: String,
    price: f64,
    category: String,
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Debug)]
enum AppError {
    NotFound,
    Unauthorized,
    Invalid(String),
    /// A body that is not the JSON expected: 400 or 422, as axum says.
    Rejected(StatusCode, String),
    Db(sqlx::Error),
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        AppError::Db(e)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            AppError::NotFound => (StatusCode::NOT_FOUND, "not found".to_owned()),
            AppError::Unauthorized => (StatusCode::UNAUTHORIZED, "send Authorization: Bearer <name>".to_owned()),
            AppError::Invalid(why) => (StatusCode::UNPROCESSABLE_ENTITY, why),
            AppError::Rejected(status, why) => (status, why),
            AppError::Db(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("database error: {e}")),
        };
        (status, Json(json!({ "error": message }))).into_response()
    }
}

const PAGE_SIZE: i64 = 10;

const PRODUCT_SELECT: &str = "
    SELECT p.id, p.name, p.price, c.name AS category, COALESCE(GROUP_CONCAT(t.name), '') AS tags
    FROM products p
    JOIN categories c ON c.id = p.category_id
    LEFT JOIN product_tags pt ON pt.product_id = p.id
    LEFT JOIN tags t ON t.id = pt.tag_id";

fn product_from(row: &sqlx::sqlite::SqliteRow) -> Result<Product, sqlx::Error> {
    let tags: String = row.try_get("tags")?;
    let mut tags: Vec<String> = tags.split(',').filter(|t| !t.is_empty()).map(str::to_owned).collect();
    tags.sort();
    Ok(Product {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        price: row.try_get("price")?,
        category: row.try_get("category")?,
        tags,
    })
}

// ---- the cached reads ---------------------------------------------------

/// The expensive read: a join over products, categories and tags.
#[cached(ttl = 60, prefix = "product_list", jitter = 0.1, tags("products"), skip(state))]
async fn product_list(state: &AppState, category: Option<String>, page: u32) -> Result<Vec<Product>, sqlx::Error> {
    state.queries.fetch_add(1, Relaxed);
    let sql =
        format!("{PRODUCT_SELECT} WHERE (?1 IS NULL OR c.name = ?1) GROUP BY p.id ORDER BY p.id LIMIT ?2 OFFSET ?3");
    let offset = i64::from(page.saturating_sub(1)) * PAGE_SIZE;
    let rows = sqlx::query(&sql).bind(category).bind(PAGE_SIZE).bind(offset).fetch_all(&state.db).await?;
    rows.iter().map(product_from).collect()
}

/// One product; `None` (a 404) is cached too.
#[cached(ttl = 300, prefix = "product", jitter = 0.1, skip(state))]
async fn product_by_id(state: &AppState, id: i64) -> Result<Option<Product>, sqlx::Error> {
    state.queries.fetch_add(1, Relaxed);
    let sql = format!("{PRODUCT_SELECT} WHERE p.id = ?1 GROUP BY p.id");
    let row = sqlx::query(&sql).bind(id).fetch_optional(&state.db).await?;
    row.as_ref().map(product_from).transpose()
}

/// The most ids one `GET /products?ids=...` may ask for.
const MAX_IDS: usize = 100;

/// Many products by id, each cached in an entry of its own: one `MGET`
/// for all of them, and one query for those not cached (each asked once).
/// An id that does not exist is cached as absent, so it does not reach the
/// database on every call. Writes forget the entry of the id they change.
#[cached(ttl = 300, prefix = "product_many", jitter = 0.1, batch(ids), skip(state))]
async fn products_by_ids(state: &AppState, ids: Vec<i64>) -> Result<Vec<(i64, Product)>, sqlx::Error> {
    state.queries.fetch_add(1, Relaxed);
    let placeholders = (1..=ids.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(",");
    let sql = format!("{PRODUCT_SELECT} WHERE p.id IN ({placeholders}) GROUP BY p.id");
    let mut query = sqlx::query(&sql);
    for id in &ids {
        query = query.bind(id);
    }
    let rows = query.fetch_all(&state.db).await?;
    rows.iter().map(|row| product_from(row).map(|product| (product.id, product))).collect()
}

/// Forgets the per-id entries of a product that was written.
async fn forget_by_id(state: &AppState, id: i64) {
    if let Err(e) = cache_runtime::forget(products_by_ids(state, vec![id])).await {
        eprintln!("could not forget product {id} in `product_many` ({e}): it may be served until its TTL");
    }
}

/// Per-user data: the principal is an argument, so it is part of the key
/// and one user never sees another's answer.
#[cached(ttl = 120, prefix = "recommendations", tags("products"), skip(state))]
async fn recommendations(state: &AppState, user: String) -> Result<Vec<Product>, sqlx::Error> {
    state.queries.fetch_add(2, Relaxed);
    let categories: Vec<String> = sqlx::query("SELECT name FROM categories ORDER BY id")
        .fetch_all(&state.db)
        .await?
        .iter()
        .map(|row| row.try_get("name"))
        .collect::<Result<_, _>>()?;
    // A stand-in for a real model: each user has a favourite category.
    let favourite = user.bytes().map(usize::from).sum::<usize>() % categories.len().max(1);
    let sql = format!("{PRODUCT_SELECT} WHERE c.name = ?1 GROUP BY p.id ORDER BY p.price, p.id LIMIT 3");
    let rows = sqlx::query(&sql).bind(categories.get(favourite)).fetch_all(&state.db).await?;
    rows.iter().map(product_from).collect()
}

// ---- handlers -------------------------------------------------------------

#[derive(Deserialize)]
struct ListQuery {
    category: Option<String>,
    page: Option<u32>,
    /// `1,2,3`: these products, in this order (those that exist).
    ids: Option<String>,
}

async fn list_products(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<Product>>, AppError> {
    if let Some(ids) = q.ids {
        let ids = parse_ids(&ids)?;
        let found = products_by_ids(&state, ids).await?;
        return Ok(Json(found.into_iter().map(|(_, product)| product).collect()));
    }
    Ok(Json(product_list(&state, q.category, q.page.unwrap_or(1).max(1)).await?))
}

/// `1,2,3`: at most [`MAX_IDS`] ids, checked before anything is allocated
/// for them.
fn parse_ids(ids: &str) -> Result<Vec<i64>, AppError> {
    if ids.split(',').count() > MAX_IDS {
        return Err(AppError::Invalid(format!("at most {MAX_IDS} ids at once")));
    }
    ids.split(',')
        .map(|id| id.trim().parse().map_err(|_| AppError::Invalid(format!("`{id}` is not a product id"))))
        .collect()
}

async fn get_product(State(state): State<AppState>, Path(id): Path<i64>) -> Result<Json<Product>, AppError> {
    product_by_id(&state, id).await?.map(Json).ok_or(AppError::NotFound)
}

/// Not cached by a function: the response layer on this route caches it.
async fn list_categories(State(state): State<AppState>) -> Result<Json<serde_json::Value>, AppError> {
    state.queries.fetch_add(1, Relaxed);
    let rows = sqlx::query(
        "SELECT c.name, COUNT(p.id) AS products FROM categories c
         LEFT JOIN products p ON p.category_id = c.id GROUP BY c.id ORDER BY c.id",
    )
    .fetch_all(&state.db)
    .await?;
    let categories: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| {
            Ok(json!({ "name": row.try_get::<String, _>("name")?, "products": row.try_get::<i64, _>("products")? }))
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(Json(serde_json::Value::Array(categories)))
}

fn principal(headers: &HeaderMap) -> Result<String, AppError> {
    let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or(AppError::Unauthorized)?;
    let user = value.strip_prefix("Bearer ").map(str::trim).filter(|u| !u.is_empty()).ok_or(AppError::Unauthorized)?;
    Ok(user.to_owned())
}

async fn my_recommendations(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Vec<Product>>, AppError> {
    let user = principal(&headers)?;
    Ok(Json(recommendations(&state, user).await?))
}

fn validated(body: Result<Json<NewProduct>, JsonRejection>) -> Result<NewProduct, AppError> {
    let Json(product) = body.map_err(|rejection| AppError::Rejected(rejection.status(), rejection.body_text()))?;
    if product.name.trim().is_empty() {
        return Err(AppError::Invalid("name must not be empty".into()));
    }
    if !product.price.is_finite() || product.price < 0.0 {
        return Err(AppError::Invalid("price must be a number, zero or more".into()));
    }
    Ok(product)
}

/// Writes the product's fields and tags; `None` id inserts.
async fn write_product(db: &mut SqliteConnection, id: Option<i64>, p: &NewProduct) -> Result<i64, AppError> {
    let category: Option<i64> = sqlx::query("SELECT id FROM categories WHERE name = ?1")
        .bind(&p.category)
        .fetch_optional(&mut *db)
        .await?
        .map(|r| r.get(0));
    let category = category.ok_or_else(|| AppError::Invalid(format!("unknown category `{}`", p.category)))?;
    let id = match id {
        Some(id) => {
            let updated = sqlx::query("UPDATE products SET name = ?1, price = ?2, category_id = ?3 WHERE id = ?4")
                .bind(&p.name)
                .bind(p.price)
                .bind(category)
                .bind(id)
                .execute(&mut *db)
                .await?;
            if updated.rows_affected() == 0 {
                return Err(AppError::NotFound);
            }
            sqlx::query("DELETE FROM product_tags WHERE product_id = ?1").bind(id).execute(&mut *db).await?;
            id
        }
        None => sqlx::query("INSERT INTO products (name, price, category_id) VALUES (?1, ?2, ?3)")
            .bind(&p.name)
            .bind(p.price)
            .bind(category)
            .execute(&mut *db)
            .await?
            .last_insert_rowid(),
    };
    for tag in &p.tags {
        sqlx::query("INSERT OR IGNORE INTO tags (name) VALUES (?1)").bind(tag).execute(&mut *db).await?;
        sqlx::query("INSERT OR IGNORE INTO product_tags (product_id, tag_id) SELECT ?1, id FROM tags WHERE name = ?2")
            .bind(id)
            .bind(tag)
            .execute(&mut *db)
            .await?;
    }
    Ok(id)
}

/// After any product write: every list, count and recommendation is stale.
/// If Redis cannot be told, say so loudly; entries still expire by TTL.
async fn invalidate_lists(state: &AppState) {
    for namespace in ["products", "categories"] {
        if let Err(e) = state.cache.invalidate(namespace).await {
            eprintln!("could not invalidate `{namespace}` ({e}): cached lists may be stale until their TTL");
        }
    }
}

async fn create_product(State(state): State<AppState>, body: Result<Json<NewProduct>, JsonRejection>) -> Response {
    let product = match validated(body) {
        Ok(product) => product,
        Err(e) => return e.into_response(),
    };
    let result = async {
        let mut tx = state.db.begin().await?;
        let id = write_product(&mut tx, None, &product).await?;
        tx.commit().await?;
        Ok::<_, AppError>(id)
    }
    .await;
    match result {
        Ok(id) => {
            invalidate_lists(&state).await;
            // The id may have been asked for, and cached as absent.
            forget_by_id(&state, id).await;
            // Write-through: the new product is cached (and a cached 404 replaced).
            match cache_runtime::refresh(product_by_id(&state, id)).await {
                Ok(Some(created)) => (StatusCode::CREATED, Json(created)).into_response(),
                Ok(None) => AppError::NotFound.into_response(),
                Err(e) => AppError::Db(e).into_response(),
            }
        }
        Err(e) => e.into_response(),
    }
}

async fn update_product(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    body: Result<Json<NewProduct>, JsonRejection>,
) -> Response {
    let product = match validated(body) {
        Ok(product) => product,
        Err(e) => return e.into_response(),
    };
    let result = async {
        let mut tx = state.db.begin().await?;
        write_product(&mut tx, Some(id), &product).await?;
        tx.commit().await?;
        Ok::<_, AppError>(())
    }
    .await;
    if let Err(e) = result {
        return e.into_response();
    }
    invalidate_lists(&state).await;
    forget_by_id(&state, id).await;
    // Write-through, and know whether readers will see it: when the cache
    // could not take the new value, say so (a real service might retry,
    // or alert), since other processes may serve the old one until its TTL.
    let (updated, reached) = cache_runtime::try_refresh(product_by_id(&state, id)).await;
    if let Err(e) = reached {
        eprintln!(
            "product {id} updated, but the cache did not take it ({e}): the old value may be served until its TTL"
        );
    }
    match updated {
        Ok(Some(updated)) => Json(updated).into_response(),
        Ok(None) => AppError::NotFound.into_response(),
        Err(e) => AppError::Db(e).into_response(),
    }
}

async fn delete_product(State(state): State<AppState>, Path(id): Path<i64>) -> Result<StatusCode, AppError> {
    state.queries.fetch_add(1, Relaxed);
    let deleted = sqlx::query("DELETE FROM products WHERE id = ?1").bind(id).execute(&state.db).await?;
    if deleted.rows_affected() == 0 {
        return Err(AppError::NotFound);
    }
    invalidate_lists(&state).await;
    forget_by_id(&state, id).await;
    if let Err(e) = cache_runtime::forget(product_by_id(&state, id)).await {
        eprintln!("could not forget product {id} ({e}): it may be served until its TTL");
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn stats(State(state): State<AppState>) -> Json<serde_json::Value> {
    let stats = state.cache.stats();
    let prefixes: serde_json::Map<String, serde_json::Value> = stats
        .prefixes
        .iter()
        .map(|(name, c)| {
            let value = json!({ "hits": c.hits, "misses": c.misses, "coalesced": c.coalesced,
                                "bypassed": c.bypassed, "errors": c.errors(), "hit_rate": c.hit_rate() });
            (name.clone(), value)
        })
        .collect();
    Json(json!({
        "db_queries": state.queries.load(Relaxed),
        "hit_rate": stats.hit_rate(),
        "hits": stats.total.hits,
        "misses": stats.total.misses,
        "bypassed": stats.total.bypassed,
        "prefixes": prefixes,
    }))
}

fn router(state: AppState) -> Router {
    let categories_page = Policy::new("categories_page").ttl(Duration::from_secs(600)).jitter(0.1).tags(["categories"]);
    Router::new()
        .route("/products", get(list_products).post(create_product))
        .route("/products/{id}", get(get_product).put(update_product).delete(delete_product))
        .route("/categories", get(list_categories).route_layer(CacheLayer::new(state.cache.clone(), categories_page)))
        .route("/me/recommendations", get(my_recommendations))
        .route("/stats", get(stats))
        .with_state(state)
}

// ---- the database -----------------------------------------------------------

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS categories (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
    "CREATE TABLE IF NOT EXISTS products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, price REAL NOT NULL,
        category_id INTEGER NOT NULL REFERENCES categories(id))",
    "CREATE TABLE IF NOT EXISTS tags (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
    "CREATE TABLE IF NOT EXISTS product_tags (product_id INTEGER NOT NULL REFERENCES products(id) ON DELETE CASCADE,
        tag_id INTEGER NOT NULL REFERENCES tags(id), PRIMARY KEY (product_id, tag_id))",
];

async fn open_database() -> Result<SqlitePool, Box<dyn std::error::Error>> {
    let url = match std::env::var("DATABASE_URL") {
        Ok(url) => url,
        Err(_) => {
            let path = std::env::temp_dir().join(format!("products-api-{}.db", std::process::id()));
            let _ = std::fs::remove_file(&path);
            format!("sqlite://{}", path.display())
        }
    };
    let options = SqliteConnectOptions::from_str(&url)?.create_if_missing(true).foreign_keys(true);
    let db = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
    for statement in SCHEMA {
        sqlx::query(statement).execute(&db).await?;
    }
    let seeded: i64 = sqlx::query("SELECT COUNT(*) FROM products").fetch_one(&db).await?.get(0);
    if seeded == 0 {
        seed(&db).await?;
    }
    Ok(db)
}

async fn seed(db: &SqlitePool) -> Result<(), sqlx::Error> {
    let mut tx = db.begin().await?;
    for name in ["kitchen", "outdoor", "books", "garden"] {
        sqlx::query("INSERT INTO categories (name) VALUES (?1)").bind(name).execute(&mut *tx).await?;
    }
    for name in ["sale", "new", "eco", "gift"] {
        sqlx::query("INSERT INTO tags (name) VALUES (?1)").bind(name).execute(&mut *tx).await?;
    }
    for i in 1..=40i64 {
        let product = NewProduct {
            name: format!("Product {i}"),
            price: 5.0 + (i * 37 % 100) as f64,
            category: ["kitchen", "outdoor", "books", "garden"][(i % 4) as usize].to_owned(),
            tags: ["sale", "new", "eco", "gift"].iter().take((i % 3) as usize).map(|t| (*t).to_owned()).collect(),
        };
        write_product(&mut tx, None, &product).await.map_err(|e| match e {
            AppError::Db(e) => e,
            other => sqlx::Error::Protocol(format!("{other:?}")),
        })?;
    }
    tx.commit().await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let cache = Cache::builder().url(&redis_url).key_prefix("products-api").build()?;
    cache_runtime::init(cache.clone())?;
    let db = open_database().await?;
    // A fresh database: entries cached for an earlier one are stale.
    for namespace in ["products", "categories", "product", "product_list", "product_many"] {
        if let Err(e) = cache.invalidate(namespace).await {
            eprintln!("Redis at {redis_url} is unreachable ({e}): serving uncached until it is back");
            break;
        }
    }
    let state = AppState { db, cache, queries: Arc::default() };
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router(state)).await?;
    Ok(())
}
