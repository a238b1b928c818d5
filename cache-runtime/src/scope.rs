//! Per-entry operations named by the call itself: `forget(f(args))` and
//! `refresh(f(args))`. The call's own arguments pick the entry, so nobody
//! rebuilds key strings, and it works wherever `#[cached]` does (free
//! functions, inherent and trait methods, generics).
//!
//! The wrappers set a task-local that the cached call reads when it starts.

use crate::error::Error;
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;

type ForgetReport = Arc<Mutex<Option<Result<bool, Error>>>>;

#[derive(Clone)]
pub(crate) enum Mode {
    /// Inside a refreshed call's body: nested cached calls behave normally.
    Normal,
    Refresh,
    Forget(ForgetReport),
}

tokio::task_local! {
    static MODE: Mode;
}

pub(crate) fn current() -> Mode {
    MODE.try_with(Mode::clone).unwrap_or(Mode::Normal)
}

/// Runs `body` with nested cached calls behaving normally.
pub(crate) async fn normally<F: Future>(body: F) -> F::Output {
    MODE.scope(Mode::Normal, body).await
}

/// Reports a forget's outcome to its [`forget`] wrapper.
pub(crate) fn report_forget(report: &ForgetReport, outcome: Result<bool, Error>) {
    if let Ok(mut guard) = report.lock() {
        *guard = Some(outcome);
    }
}

/// Write-through: runs the cached call's body now, even if an entry
/// exists, stores the result (if it is cacheable) over the old entry, and
/// returns it.
///
/// Use it right after a write, so readers get the new value without a miss.
/// A slower computation that started before the write never overwrites the
/// refreshed entry with what it read earlier.
///
/// ```no_run
/// # use cache_runtime::cached;
/// # #[cached(ttl = 60, prefix = "products")]
/// # async fn product(id: u64) -> Option<String> { None }
/// # async fn update() {
/// // UPDATE products SET ... WHERE id = 7; then:
/// let fresh = cache_runtime::refresh(product(7)).await;
/// # }
/// ```
pub async fn refresh<F: Future>(cached_call: F) -> F::Output {
    MODE.scope(Mode::Refresh, cached_call).await
}

/// Deletes the entry the cached call would read, without running its body.
/// Returns whether there was an entry.
///
/// A computation that was already running may still store what it read
/// before your write; when that matters, prefer [`refresh`] (whose entry an
/// older computation never overwrites) or [`invalidate`](crate::invalidate)
/// the namespace (version-checked).
///
/// `cached_call` must be a call of a `#[cached]` function; any other future
/// runs to completion and the result is [`Error::NotCached`].
///
/// ```no_run
/// # use cache_runtime::cached;
/// # #[cached(ttl = 60, prefix = "products")]
/// # async fn product(id: u64) -> Option<String> { None }
/// # async fn delete() -> Result<(), cache_runtime::Error> {
/// // DELETE FROM products WHERE id = 7; then:
/// cache_runtime::forget(product(7)).await?;
/// # Ok(()) }
/// ```
pub async fn forget<F: Future>(cached_call: F) -> Result<bool, Error> {
    let report: ForgetReport = Arc::default();
    let mut call = pin!(MODE.scope(Mode::Forget(report.clone()), cached_call));
    poll_fn(|cx| {
        let finished = call.as_mut().poll(cx).is_ready();
        let outcome = report.lock().ok().and_then(|mut guard| guard.take());
        match outcome {
            Some(outcome) => Poll::Ready(outcome),
            None if finished => Poll::Ready(Err(Error::NotCached)),
            None => Poll::Pending,
        }
    })
    .await
}
