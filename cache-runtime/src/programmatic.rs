//! The cache-aside API for code where the attribute does not fit: the
//! same flow as `#[cached]`, for a `Result` computed under a [`Policy`].

use crate::Cache;
use crate::call::{Intent, Item, Now};
use crate::error::Error;
use crate::keys::canonical::Unencodable;
use crate::keys::{KeyHash, KeyHasher};
use crate::output::{PlainOutput, ResultOutput, Storage};
use crate::policy::Policy;
use serde::{Serialize, de::DeserializeOwned};

impl Cache {
    /// Cache-aside for code where the attribute does not fit: returns the
    /// cached value for `key` in `policy`'s namespace, or awaits `compute`
    /// and stores its `Ok`. Same keys, versions, TTL, jitter and failure
    /// handling as `#[cached]`: when Redis is unavailable this is just
    /// `compute.await`.
    ///
    /// The entry is identified by the namespace, `key`, `T` and the
    /// policy's version.
    ///
    /// ```no_run
    /// use cache_runtime::{Cache, Policy};
    /// use std::time::Duration;
    ///
    /// # async fn load_report(_: &str, _: u32) -> Result<Vec<u64>, std::io::Error> { Ok(vec![]) }
    /// # async fn demo(cache: Cache) -> Result<(), std::io::Error> {
    /// let policy = Policy::new("reports").ttl(Duration::from_secs(300)).tags(["orders"]);
    /// let (region, year) = ("emea", 2026);
    /// let report = cache.get_or_compute(&policy, &(region, year), load_report(region, year)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn get_or_compute<K, T, E, F>(&self, policy: &Policy, key: &K, compute: F) -> Result<T, E>
    where
        K: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        F: Future<Output = Result<T, E>>,
    {
        self.programmatic(policy, key, Intent::Read, compute).await
    }

    /// Cache-aside for many keys at once: each key's value is cached in an
    /// entry of its own, exactly the entry
    /// [`get_or_compute`](Self::get_or_compute) of that key would use for
    /// an `Option<V>` (`None`: the key was not found). One round trip reads
    /// all of them; `compute` gets only the missing keys (each once), and
    /// what it returns is stored in one more round trip. A key it does not
    /// return is cached as absent, unless the policy says
    /// [`Absent::Skip`](crate::Absent::Skip); an `Err` is returned and
    /// nothing is stored. Keys another caller is computing are awaited, not
    /// computed again; `compute` runs a second time only for keys whose
    /// other caller failed. The result holds the keys found, each once, in
    /// the order first asked for when the map keeps an order (a `Vec`).
    /// When Redis is unavailable, `compute` gets every key.
    ///
    /// ```no_run
    /// use cache_runtime::{Cache, Policy};
    /// use std::collections::HashMap;
    ///
    /// # async fn names_where_id_in(ids: &[u64]) -> Result<HashMap<u64, String>, std::io::Error> { Ok(HashMap::new()) }
    /// # async fn demo(cache: Cache) -> Result<(), std::io::Error> {
    /// let policy = Policy::new("user_names");
    /// let names: HashMap<u64, String> =
    ///     cache.get_or_compute_many(&policy, [1, 2, 3], |missing| async move { names_where_id_in(&missing).await }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn get_or_compute_many<K, V, E, I, M, F, Fut, Out>(
        &self,
        policy: &Policy,
        keys: I,
        mut compute: F,
    ) -> Result<Out, E>
    where
        I: IntoIterator<Item = K>,
        K: Serialize,
        V: Serialize + DeserializeOwned,
        M: IntoIterator<Item = (K, V)>,
        F: FnMut(Vec<K>) -> Fut,
        Fut: Future<Output = Result<M, E>>,
        Out: FromIterator<(K, V)>,
    {
        let key_of = |key: &K| programmatic_key::<K, Option<V>>(policy, key);
        let items = keys.into_iter().map(|item| Item { key: key_of(&item), item }).collect();
        let compute = |missing: Vec<K>| {
            let found = compute(missing);
            async move { found.await.map(|map| map.into_iter().collect::<Vec<_>>()) }
        };
        let storage = Storage::of::<PlainOutput<Option<V>>>();
        let found =
            self.fetch_or_compute_many(&policy.plan(), items, storage, policy.absent_items(), &key_of, compute).await?;
        Ok(found.into_iter().collect())
    }

    /// Write-through for [`get_or_compute`](Self::get_or_compute) entries:
    /// awaits `compute` and stores its `Ok` over any existing entry.
    ///
    /// ```no_run
    /// # use cache_runtime::{Cache, Policy};
    /// # async fn demo(cache: Cache) {
    /// let policy = Policy::new("profiles");
    /// let fresh = cache.refresh(&policy, &42u64, async { Ok::<_, std::io::Error>("new name".to_owned()) }).await;
    /// # }
    /// ```
    pub async fn refresh<K, T, E, F>(&self, policy: &Policy, key: &K, compute: F) -> Result<T, E>
    where
        K: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        F: Future<Output = Result<T, E>>,
    {
        self.programmatic(policy, key, Intent::Refresh, compute).await
    }

    /// The flow of `#[cached]`, for a `Result` computed under a `Policy`.
    async fn programmatic<K, T, E, F>(&self, policy: &Policy, key: &K, intent: Intent, compute: F) -> Result<T, E>
    where
        K: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        F: Future<Output = Result<T, E>>,
    {
        let hash = programmatic_key::<K, T>(policy, key);
        self.fetch_or_compute(&policy.plan(), hash, Storage::of::<ResultOutput<T, E>>(), intent, Now(compute)).await
    }

    /// Deletes the [`get_or_compute`](Self::get_or_compute) entry of `key`
    /// holding a `T`. Returns whether there was one.
    ///
    /// ```no_run
    /// # use cache_runtime::{Cache, Policy};
    /// # async fn demo(cache: Cache) -> Result<(), cache_runtime::Error> {
    /// let existed = cache.forget::<_, String>(&Policy::new("profiles"), &42u64).await?;
    /// # Ok(()) }
    /// ```
    pub async fn forget<K, T>(&self, policy: &Policy, key: &K) -> Result<bool, Error>
    where
        K: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
    {
        let hash = programmatic_key::<K, T>(policy, key);
        self.forget_entry(&policy.plan(), hash).await
    }
}

/// The key of a programmatic entry: namespace, value type, user key.
fn programmatic_key<K: Serialize + ?Sized, T>(policy: &Policy, key: &K) -> Result<KeyHash, Unencodable> {
    let mut hasher = KeyHasher::new("cache_runtime::Cache::get_or_compute", policy.version_number());
    hasher.part(policy.prefix().as_bytes()).part(std::any::type_name::<T>().as_bytes());
    hasher.arg(key).map(|h| h.finish())
}
