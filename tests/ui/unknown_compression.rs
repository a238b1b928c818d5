use cache_runtime::cached;

#[cached(ttl = 60, compress = "gzip")]
async fn gzip(id: u64) -> u64 {
    id
}

#[cached(ttl = 60, compress = 4)]
async fn not_a_name(id: u64) -> u64 {
    id
}

fn main() {}
