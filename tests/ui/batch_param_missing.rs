use cache_runtime::cached;
use std::collections::HashMap;

#[cached(ttl = 60, batch(idz))]
async fn users(ids: Vec<u64>) -> HashMap<u64, String> {
    ids.into_iter().map(|id| (id, id.to_string())).collect()
}

fn main() {}
