//! Cold start and how cost grows: the time a cold cache takes to answer
//! from Redis, and a hit's and a miss's cost as the value, the tags, the
//! keys in Redis and the processes sharing it grow; each as ratios against
//! the raw client measured in the same run, against one private
//! redis-server.
//!
//! ```text
//! cargo bench --bench growth
//! BENCH_ONLY=cold,size cargo bench --bench growth   # sections: cold, size, tags, keys, procs
//! ```
//!
//! Settings (environment): `GROW_RUN_MS` per row (1000), `GROW_TASKS` the
//! task counts of the cost tables ("1,64"), `GROW_SIZES` in bytes
//! ("100,10000,100000,1000000"), `GROW_MISS_MB` written per miss row (256),
//! `GROW_KEYSPACE` ("1,100,10000,1000000"), `GROW_PROCS` ("1,2,4"),
//! `GROW_PROC_TASKS` (64), `GROW_COLD_KEYS` (10000), `GROW_COLD_TASKS` (64),
//! `GROW_ZIPF` the skewed run's exponent (0.99), `GROW_COLD_MAX_MS` (20000).

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "growth/cold.rs"]
mod cold;
#[path = "growth/cost.rs"]
mod cost;
#[path = "growth/harness.rs"]
mod harness;
#[path = "growth/keys.rs"]
mod keys;
#[path = "growth/procs.rs"]
mod procs;
#[path = "common/product.rs"]
mod product;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // This binary is also the worker of the processes section.
    if let Ok(mode) = std::env::var("GROW_WORKER") {
        procs::worker(&mode);
        return;
    }
    let only: String = harness::setting("BENCH_ONLY", "cold,size,tags,keys,procs".to_owned());
    let wants = |section: &str| only.split(',').any(|s| s.trim() == section);
    // DEBUG POPULATE fills the keyspace section's server in a second.
    let server = support::RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let url = server.url();
    harness::watch_redis(server.pid());
    // The `cached` crate reads its Redis URL from the environment, once.
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("CACHED_REDIS_CONNECTION_STRING", &url) };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    println!(
        "growth benchmark: {} cores, {}, {:?} per row, tasks {:?}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        String::from_utf8_lossy(
            &std::process::Command::new("redis-server").arg("--version").output().map(|o| o.stdout).unwrap_or_default()
        )
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" "),
        harness::run_time(),
        harness::task_counts()
    );
    runtime.block_on(async {
        let raw = harness::raw_connection(&url).await;
        if wants("cold") {
            cold::cold_start(&server).await;
        }
        if wants("size") {
            cost::value_size(&url, &raw).await;
        }
        if wants("tags") {
            keys::tags(&url, &raw).await;
        }
        if wants("keys") {
            keys::keyspace(&url, &raw).await;
        }
        if wants("procs") {
            procs::warm(&url).await;
        }
    });
    if wants("procs") {
        procs::processes(&url);
    }
}
