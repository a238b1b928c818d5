//! A bulk call's read that also takes the stampede locks of the items it
//! misses: the `CLAIM` script then an `MGET` of the entries and versions,
//! one pipeline, where a read then a pipeline of `LOCK` scripts took two
//! round trips. The `MGET` comes after the locks, so what it reads is what
//! a computation under them is based on, as with a single call's lock
//! taken with its read (docs/CONSISTENCY.md). Only on one server (or behind Sentinel): on a
//! cluster the tag versions live in other slots than the entries, and the
//! bulk call reads and locks in two round trips as before.

use super::Redis;
use super::many::ReadMany;
use super::remote::millis;
use super::scripts::{self, Claim, ClaimArgs};
use crate::error::Fault;
use redis::{FromRedisValue, Value};
use std::time::Duration;

/// The locks a claiming read asks for.
pub(crate) struct ClaimRequest<'a> {
    /// One per entry, in the same order.
    pub locks: &'a [String],
    pub token: &'a str,
    pub ttl: Duration,
}

/// What a claiming read found: the entries and versions, as an `MGET`
/// would have, and which locks it took.
pub(crate) struct Claimed {
    pub read: ReadMany,
    pub claims: Vec<Claim>,
}

impl Redis {
    /// Whether [`claim_many`](Self::claim_many) can run here.
    pub(crate) fn can_claim(&self) -> bool {
        !self.connections.is_cluster()
    }

    /// Takes the lock of each of `entries` that is not current, then
    /// reads them and `versions`; see `scripts::CLAIM`.
    pub(crate) async fn claim_many(
        &self,
        entries: &[&str],
        versions: &[String],
        head: &[u8],
        request: ClaimRequest<'_>,
    ) -> Result<Claimed, Fault> {
        let claim = ClaimArgs {
            version_keys: versions,
            entries,
            locks: request.locks,
            head,
            token: request.token,
            lock_ttl_ms: millis(request.ttl),
        }
        .command();
        let mut mget = super::command(
            "MGET",
            entries.len() + versions.len(),
            super::bytes_of(entries) + super::bytes_of(versions),
        );
        mget.arg(entries).arg(versions);
        let mut pipeline = redis::pipe();
        pipeline.ignore_errors().add_command(claim.clone()).add_command(mget.clone());
        let mut replies = self.connections.run(|conn| conn.pipeline(&pipeline)).await?;
        if matches!(replies.first(), Some(Value::ServerError(e)) if e.code() == "NOSCRIPT") {
            // A server that lost the script (restarted, flushed) answered
            // the MGET too: both again, in order, after loading it.
            let mut again = redis::pipe();
            again.ignore_errors().add_command(scripts::load_claim()).add_command(claim).add_command(mget);
            replies = self.connections.run(|conn| conn.pipeline(&again)).await?;
            replies.drain(..replies.len().min(1));
        }
        let shape = |what: &str| Fault::Server(format!("the claim pipeline replied in an unexpected shape: {what}"));
        let [claims, values] = <[Value; 2]>::try_from(replies).map_err(|_| shape("count"))?;
        if let Value::ServerError(e) = &claims {
            return Err(Fault::Server(format!("{e:?}")));
        }
        let claims = Vec::<i64>::from_redis_value(claims).map_err(|e| shape(&e.to_string()))?;
        let mut values = Vec::<Option<Vec<u8>>>::from_redis_value(values).map_err(|e| shape(&e.to_string()))?;
        let claims = claims.into_iter().map(Claim::parse).collect::<Option<Vec<_>>>().ok_or_else(|| shape("claims"))?;
        if claims.len() != entries.len() || values.len() != entries.len() + versions.len() {
            return Err(shape("count"));
        }
        let versions = values.split_off(entries.len());
        Ok(Claimed { read: ReadMany { entries: values, versions }, claims })
    }
}
