use cache_runtime::cached;
use std::collections::HashMap;

#[cached(ttl = 60, batch(id))]
async fn user(id: u64) -> HashMap<u64, String> {
    HashMap::from([(id, id.to_string())])
}

fn main() {}
