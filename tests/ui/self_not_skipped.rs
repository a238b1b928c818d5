use cache_runtime::cached;

struct Repo;

impl Repo {
    #[cached(ttl = 60)]
    async fn row(&self, id: u64) -> u64 {
        id
    }
}

fn main() {}
