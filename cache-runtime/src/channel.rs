//! The invalidation channel: Redis pub/sub messages that tell every
//! process's local tier what another process invalidated or forgot.
//!
//! Messages are published inside the scripts that change Redis (`INCR` of a
//! version, `DEL` of an entry, a write-through), so there is no window in
//! which Redis changed and nothing was announced. The subscriber runs on its
//! own connection, outside the pool; the tier trusts its entries only while
//! that subscription is confirmed live, and pings it every second, so a
//! silently dead link stops the tier from serving within a second plus the
//! command timeout.

use crate::key::KeyHash;
use crate::local::LocalTier;
use futures_util::StreamExt;
use std::sync::{Arc, Weak};
use std::time::Duration;

const PING_EVERY: Duration = Duration::from_secs(1);
const FIRST_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// This cache's channel name and its identity as a sender.
#[derive(Debug, Clone)]
pub(crate) struct Channel {
    pub name: String,
    /// Tells this cache's own messages apart: it applied them already.
    origin: String,
}

impl Channel {
    /// `<key_prefix>:invalidations`: inside the key prefix, so an ACL user
    /// limited to `~app:*` needs only `&app:*` for channels.
    pub(crate) fn new(key_prefix: &str) -> Self {
        Self { name: format!("{key_prefix}:invalidations"), origin: format!("{:016x}", rand::random::<u64>()) }
    }

    pub(crate) fn namespace_message(&self, namespace: &str) -> String {
        format!("{}|n|{namespace}", self.origin)
    }

    pub(crate) fn entry_message(&self, hash: KeyHash) -> String {
        format!("{}|e|{hash}", self.origin)
    }

    /// Applies another process's message to `tier`.
    fn apply(&self, tier: &LocalTier, message: &[u8]) {
        let mut parts = message.splitn(3, |&b| b == b'|');
        let (Some(origin), Some(kind), Some(subject)) = (parts.next(), parts.next(), parts.next()) else { return };
        if origin == self.origin.as_bytes() {
            return;
        }
        match kind {
            b"n" => {
                if let Ok(namespace) = std::str::from_utf8(subject) {
                    tier.invalidate_known(namespace);
                }
            }
            b"e" => {
                if let Some(hash) = KeyHash::from_hex(subject) {
                    tier.forget(&hash);
                }
            }
            _ => {}
        }
    }
}

/// Keeps `tier` subscribed to `channel` until `shutdown`'s sender is
/// dropped (with the cache). Returns at once; the work is a spawned task.
/// After a subscription ends, the next is tried on the next of `nodes`: on
/// a cluster, a dead node does not keep the tier unused.
pub(crate) fn listen(
    tier: &Arc<LocalTier>,
    nodes: Arc<[redis::Client]>,
    channel: Channel,
    timeout: Duration,
    mut shutdown: tokio::sync::watch::Receiver<()>,
) -> bool {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return false };
    let tier = Arc::downgrade(tier);
    runtime.spawn(async move {
        let mut retry = FIRST_RETRY;
        // Warn once per outage, not once per retry.
        let mut warned = false;
        for client in nodes.iter().cycle() {
            let mut was_live = false;
            let session = subscribe(&tier, client, &channel, timeout, &mut was_live);
            let ended = tokio::select! {
                _ = shutdown.changed() => return,
                ended = session => ended,
            };
            let Some(live) = tier.upgrade() else { return };
            live.distrust();
            drop(live);
            if was_live {
                (warned, retry) = (false, FIRST_RETRY);
            }
            if !warned {
                tracing::warn!(
                    target: "cache_runtime",
                    "the invalidation channel `{}` is down ({ended}): local entries are not used until it is back",
                    channel.name
                );
                warned = true;
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(MAX_RETRY);
        }
    });
    true
}

/// One subscription, from connecting to its end; returns why it ended.
async fn subscribe(
    tier: &Weak<LocalTier>,
    client: &redis::Client,
    channel: &Channel,
    timeout: Duration,
    was_live: &mut bool,
) -> String {
    let pubsub = match tokio::time::timeout(timeout, client.get_async_pubsub()).await {
        Ok(Ok(pubsub)) => pubsub,
        Ok(Err(e)) => return e.to_string(),
        Err(_) => return "connecting timed out".to_owned(),
    };
    let (mut sink, mut stream) = pubsub.split();
    match tokio::time::timeout(timeout, sink.subscribe(&channel.name)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return format!("could not subscribe ({e}); an ACL user needs access to the channel: `&{}`", channel.name);
        }
        Err(_) => return "subscribing timed out".to_owned(),
    }
    let Some(live) = tier.upgrade() else { return "the cache was dropped".to_owned() };
    live.trust();
    drop(live);
    tracing::debug!(target: "cache_runtime", "listening for invalidations on `{}`", channel.name);
    *was_live = true;
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else { return "the connection closed".to_owned() };
                let Some(live) = tier.upgrade() else { return "the cache was dropped".to_owned() };
                channel.apply(&live, message.get_payload_bytes());
            }
            _ = ping.tick() => {
                match tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return e.to_string(),
                    Err(_) => return "a ping timed out".to_owned(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_from_others_are_applied_and_our_own_skipped() {
        let tier = LocalTier::new(10, false);
        let _site = tier.site(["products"].into_iter());
        let (ours, theirs) = (Channel::new("app"), Channel::new("app"));
        assert_eq!(ours.name, "app:invalidations");
        ours.apply(&tier, theirs.namespace_message("products").as_bytes());
        assert_eq!(tier.invalidate("products"), 2, "one bump from the message, one here");
        ours.apply(&tier, ours.namespace_message("products").as_bytes());
        assert_eq!(tier.invalidate("products"), 3, "our own message was skipped");
        ours.apply(&tier, theirs.namespace_message("nobody-here").as_bytes());
        assert_eq!(tier.epoch_count(), 1, "no epoch for a namespace no site uses");
        ours.apply(&tier, b"garbage");
        ours.apply(&tier, b"x|e|not-hex");
    }
}
