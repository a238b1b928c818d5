use cache_runtime::cached;

struct Db;

struct Repo;

impl Repo {
    #[cached(ttl = 60, refresh_ahead = 0.8, skip(self, db))]
    async fn price(&self, db: &Db, id: u64) -> u64 {
        let _ = db;
        id
    }
}

#[cached(ttl = 60, refresh_ahead = 0.8)]
async fn label<'a>(name: std::borrow::Cow<'a, str>) -> String {
    name.into_owned()
}

fn main() {}
