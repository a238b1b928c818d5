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

use super::LocalTier;
use crate::keys::KeyHash;
use futures_util::StreamExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
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
    fn apply(&self, tier: &LocalTier, message: &[u8]) -> bool {
        let mut parts = message.splitn(3, |&b| b == b'|');
        let (Some(origin), Some(kind), Some(subject)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        if origin == self.origin.as_bytes() {
            return false;
        }
        match kind {
            b"n" => std::str::from_utf8(subject).map(|namespace| tier.invalidate_known(namespace)).is_ok(),
            b"e" => KeyHash::from_hex(subject).map(|hash| tier.forget(&hash)).is_some(),
            _ => false,
        }
    }
}

/// What a listener shares with its cache.
pub(crate) struct Listener {
    pub tier: Weak<LocalTier>,
    /// The cache's write fence, bumped by every message applied.
    pub fence: Arc<AtomicU64>,
    /// Set while a listener task is alive; cleared when it ends, however
    /// it ends, so that the next call starts another.
    pub running: Arc<AtomicBool>,
}

/// Ends a listener: whatever the reason (the cache dropped, its thread
/// gone), the tier stops trusting what it holds, and the next call that
/// uses the tier starts another listener.
struct Running {
    tier: Weak<LocalTier>,
    running: Arc<AtomicBool>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tier) = self.tier.upgrade() {
            tier.distrust();
        }
        self.running.store(false, SeqCst);
    }
}

/// Keeps `tier` subscribed to `channel` until `shutdown`'s sender is
/// dropped (with the cache). Returns at once; the work runs on a thread and
/// runtime of its own, not on the caller's runtime: that one may be gone
/// long before the cache (a `#[tokio::test]`, a runtime per request, a
/// process-wide cache used from several), and a listener that died with it
/// would leave the tier trusting entries that other processes invalidated.
/// After a subscription ends, the next is tried on the next of `nodes`: on
/// a cluster, a dead node does not keep the tier unused.
pub(crate) fn listen(
    listener: Listener,
    nodes: Arc<[redis::Client]>,
    channel: Channel,
    timeout: Duration,
    shutdown: tokio::sync::watch::Receiver<()>,
) -> bool {
    let Listener { tier, fence, running } = listener;
    let guard = Running { tier: tier.clone(), running };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::warn!(target: "cache_runtime", "could not start the invalidation listener's runtime: {e}");
            return false;
        }
    };
    let started = std::thread::Builder::new().name("cache-invalidations".to_owned()).spawn(move || {
        let _guard = guard;
        runtime.block_on(listen_until_shutdown(tier, fence, nodes, channel, timeout, shutdown));
    });
    if let Err(e) = started {
        tracing::warn!(target: "cache_runtime", "could not start the invalidation listener's thread: {e}");
        return false;
    }
    true
}

async fn listen_until_shutdown(
    tier: Weak<LocalTier>,
    fence: Arc<AtomicU64>,
    nodes: Arc<[redis::Client]>,
    channel: Channel,
    timeout: Duration,
    mut shutdown: tokio::sync::watch::Receiver<()>,
) {
    let mut retry = FIRST_RETRY;
    // Warn once per outage, not once per retry.
    let mut warned = false;
    for client in nodes.iter().cycle() {
        let mut was_live = false;
        let session = subscribe(&tier, &fence, client, &channel, timeout, &mut was_live);
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
}

/// One subscription, from connecting to its end; returns why it ended.
async fn subscribe(
    tier: &Weak<LocalTier>,
    fence: &AtomicU64,
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
                if channel.apply(&live, message.get_payload_bytes()) {
                    fence.fetch_add(1, SeqCst);
                }
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
        let tier = LocalTier::new(crate::local::Bounds::entries(10), false);
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
