// A body that does not parse: the syntax error is the only error; the
// function keeps its signature, so its callers still compile.
use cache_runtime::cached;

#[cached(ttl = 60, prefix = "prices")]
async fn price(id: u64) -> u64 {
    let doubled = id * ;
    doubled
}

async fn total(ids: Vec<u64>) -> u64 {
    let mut total = 0;
    for id in ids {
        total += price(id).await;
    }
    total
}

fn main() {
    let _ = total(vec![1, 2]);
}
