use cache_runtime::cached;

struct Filter {
    min: u32,
}

#[cached(ttl = 60)]
async fn search(filter: Filter) -> u32 {
    filter.min
}

fn main() {}
