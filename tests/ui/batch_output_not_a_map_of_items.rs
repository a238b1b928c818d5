use cache_runtime::cached;
use std::collections::HashMap;

#[cached(ttl = 60, batch(ids))]
async fn names(ids: Vec<u64>) -> HashMap<String, String> {
    ids.into_iter().map(|id| (id.to_string(), id.to_string())).collect()
}

#[cached(ttl = 60, batch(ids))]
async fn count(ids: Vec<u64>) -> usize {
    ids.len()
}

fn main() {}
