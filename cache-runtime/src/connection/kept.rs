//! The connections kept checked out of the pool, in places that calls
//! share round robin, and how a broken one is replaced.

use super::*;

impl Connections {
    /// A handle on a kept, healthy connection and its place, without
    /// waiting; or the index of the place to fill.
    pub(super) fn kept_connection(&self) -> Result<(Conn, usize), usize> {
        let index = self.next_kept.fetch_add(1, Relaxed) % self.kept.len();
        let Ok(place) = self.kept[index].read() else { return Err(index) };
        match place.as_ref() {
            Some(pooled) if !pooled.broken.load(Relaxed) => Ok((self.handle(pooled), index)),
            _ => Err(index),
        }
    }

    /// Fills an empty or broken place from the pool, within the connect
    /// deadline; or, when another caller refilled it meanwhile, uses that.
    pub(super) async fn checkout(&self, index: usize) -> Result<Conn, Fault> {
        match tokio::time::timeout(self.deadlines.connect, self.refill(index)).await {
            Err(_) => Err(Fault::Timeout),
            Ok(result) => result,
        }
    }

    pub(super) async fn refill(&self, index: usize) -> Result<Conn, Fault> {
        let _refilling = self.refills[index].lock().await;
        if let Some(conn) = self.healthy(index) {
            return Ok(conn);
        }
        self.retire(index);
        let pooled = match self.pool.get().await {
            Ok(pooled) => pooled,
            Err(managed::PoolError::Backend(e)) if refused_credentials(&e) => {
                return Err(Fault::Connection(format!(
                    "Redis refused the credentials: check the password or ACL user in the URL ({e})"
                )));
            }
            Err(e) => return Err(Fault::Connection(e.to_string())),
        };
        let conn = self.handle(&pooled);
        if let Ok(mut place) = self.kept[index].write() {
            // Empty: this refill retired what was there, and holds the
            // place's refill lock.
            *place = Some(pooled);
        }
        Ok(conn)
    }

    /// The place's connection, if it is there and healthy.
    pub(super) fn healthy(&self, index: usize) -> Option<Conn> {
        let place = self.kept[index].read().ok()?;
        let pooled = place.as_ref().filter(|pooled| !pooled.broken.load(Relaxed))?;
        Some(self.handle(pooled))
    }

    /// Takes the place's broken connection out of the pool, freeing its
    /// permit for the replacement. The socket closes as the last call
    /// still using it lets go.
    pub(super) fn retire(&self, index: usize) {
        let broken = match self.kept[index].write() {
            Ok(mut place) => place.take_if(|kept| kept.broken.load(Relaxed)),
            Err(_) => None,
        };
        if let Some(broken) = broken {
            drop(managed::Object::take(broken));
        }
    }
}
