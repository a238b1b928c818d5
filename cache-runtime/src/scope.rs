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

/// Where a wrapper hears what the cached call did.
type Report<T> = Arc<Mutex<Option<T>>>;

/// A forget's state: whether a cached call took it (on the first poll of
/// the wrapped future), and its outcome.
#[derive(Default)]
pub(crate) struct ForgetState {
    claimed: bool,
    outcome: Option<Result<bool, Error>>,
}

type ForgetReport = Arc<Mutex<ForgetState>>;

#[derive(Clone)]
pub(crate) enum Mode {
    /// Inside a refreshed call's body: nested cached calls behave normally.
    Normal,
    /// Write-through; `try_refresh` hears whether it reached the cache.
    Refresh(Option<Report<Result<(), Error>>>),
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

/// Claims a forget for the cached call that starts under it: the first
/// one only.
pub(crate) fn claim_forget(report: &ForgetReport) -> bool {
    report.lock().map(|mut state| !std::mem::replace(&mut state.claimed, true)).unwrap_or(false)
}

/// Reports a forget's outcome to its [`forget`] wrapper.
pub(crate) fn report_forget(report: &ForgetReport, outcome: Result<bool, Error>) {
    if let Ok(mut state) = report.lock() {
        state.outcome = Some(outcome);
    }
}

/// Reports a write-through's outcome to its [`try_refresh`] wrapper, if any.
pub(crate) fn report_refresh(outcome: Result<(), Error>) {
    let _ = MODE.try_with(|mode| {
        if let Mode::Refresh(Some(report)) = mode
            && let Ok(mut reported) = report.lock()
        {
            *reported = Some(outcome);
        }
    });
}

/// Write-through: runs the cached call's body now, even if an entry
/// exists, stores the result (if it is cacheable) over the old entry, and
/// returns it.
///
/// Use it right after a write, so readers get the new value without a miss.
/// A slower computation that started before the write never overwrites the
/// refreshed entry with what it read earlier. When the entry changed while
/// this one computed (another write-through, say), neither value is kept:
/// the entry is forgotten and the next reader computes afresh. When the
/// function fails, the entry is forgotten too. [`try_refresh`] says whether
/// it reached the cache.
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
    MODE.scope(Mode::Refresh(None), cached_call).await
}

/// [`refresh`] that tells whether the new value reached the cache: `Err`
/// when Redis could not be asked or refused the store, so a write path
/// can retry or report it instead of believing readers see the new value.
/// Either way it returns what the call returned. When the function's
/// output is not cacheable (an `Err`), the old entry is forgotten instead,
/// and the outcome is that of the forget.
///
/// `cached_call` must be a call of a `#[cached]` function; any other future
/// runs to completion and the result is [`Error::NotCached`].
///
/// ```no_run
/// # use cache_runtime::cached;
/// # #[cached(ttl = 60, prefix = "products")]
/// # async fn product(id: u64) -> Option<String> { None }
/// # async fn update() -> Result<(), cache_runtime::Error> {
/// // UPDATE products SET ... WHERE id = 7; then:
/// let (fresh, reached) = cache_runtime::try_refresh(product(7)).await;
/// reached?;
/// # Ok(()) }
/// ```
pub async fn try_refresh<F: Future>(cached_call: F) -> (F::Output, Result<(), Error>) {
    let report: Report<Result<(), Error>> = Arc::default();
    let output = MODE.scope(Mode::Refresh(Some(report.clone())), cached_call).await;
    let reached = report.lock().ok().and_then(|mut reported| reported.take()).unwrap_or(Err(Error::NotCached));
    (output, reached)
}

/// Deletes the entry the cached call would read, without running its body.
/// Returns whether there was an entry.
///
/// A computation that was already running may still store what it read
/// before your write; when that matters, prefer [`refresh`] (whose entry an
/// older computation never overwrites) or [`invalidate`](crate::invalidate)
/// the namespace (version-checked).
///
/// `cached_call` must be a call of a `#[cached]` function, which takes the
/// forget when it is first polled. Any other future is dropped after its
/// first poll and the result is [`Error::NotCached`]: a future that awaits
/// something else first would otherwise forget the wrong entry, or none.
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
        let (claimed, outcome) = match report.lock() {
            Ok(mut state) => (state.claimed, state.outcome.take()),
            Err(_) => (false, None),
        };
        match outcome {
            Some(outcome) => Poll::Ready(outcome),
            // Not taken on the first poll: not a call of a cached function.
            None if finished || !claimed => Poll::Ready(Err(Error::NotCached)),
            None => Poll::Pending,
        }
    })
    .await
}
