//! One identity's token, shared by every request of every backend that uses the identity.
//!
//! - A token is refreshed before it expires: 5 minutes before, or halfway through its life when it
//!   lives less than 10 minutes. The request that finds the refresh due starts it in the background
//!   and, like every other request meanwhile, goes on with the still-valid token.
//! - Without a valid token, requests wait for one fetch and all share its result (no stampede).
//! - A failed fetch is never cached as a token. The next fetch waits out a backoff (half a second,
//!   doubling up to 30 s, reset by a success) so a broken endpoint is not hammered; requests in the
//!   backoff get the last error at once. A failed refresh leaves the valid token in use.
//! - A token is not handed out in the last tenth of its life (at most 30 s before expiry), so it does
//!   not expire on its way to the backend.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use http::HeaderValue;

use super::{AccessToken, IdentityError, TokenSource, provider_name};
use crate::config::IdentityProvider;

const REFRESH_BEFORE: Duration = Duration::from_secs(300);
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The `Authorization` value of a token, or why there is none.
pub type TokenResult = Result<HeaderValue, IdentityError>;
type Fetch = Shared<BoxFuture<'static, TokenResult>>;
/// The clock; injected so tests can move time.
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

pub struct TokenCache {
    inner: Arc<Inner>,
}

struct Inner {
    source: Box<dyn TokenSource>,
    now: Clock,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    token: Option<CachedToken>,
    fetching: Option<Fetch>,
    failure: Option<Failure>,
}

struct CachedToken {
    header: HeaderValue,
    refresh_at: Instant,
    usable_until: Instant,
}

struct Failure {
    error: IdentityError,
    retry_at: Instant,
    backoff: Duration,
}

impl TokenCache {
    pub fn new(source: Box<dyn TokenSource>) -> Self {
        Self::with_clock(source, Arc::new(Instant::now))
    }

    pub fn with_clock(source: Box<dyn TokenSource>, now: Clock) -> Self {
        Self { inner: Arc::new(Inner { source, now, state: Mutex::new(State::default()) }) }
    }

    pub fn provider(&self) -> IdentityProvider {
        self.inner.source.provider()
    }

    /// `Bearer <token>`, marked sensitive.
    pub async fn authorization(&self) -> TokenResult {
        let fetch = {
            let mut state = self.inner.lock();
            let now = (self.inner.now)();
            let may_fetch = state.failure.as_ref().is_none_or(|f| now >= f.retry_at);
            let valid = state.token.as_ref().filter(|t| now < t.usable_until);
            if let Some(token) = valid {
                let header = token.header.clone();
                if now >= token.refresh_at && state.fetching.is_none() && may_fetch {
                    state.fetching = Some(self.inner.start_fetch());
                }
                return Ok(header);
            }
            match (&state.fetching, &state.failure) {
                (Some(fetch), _) => fetch.clone(),
                (None, Some(failure)) if !may_fetch => return Err(failure.error.clone()),
                (None, _) => state.fetching.insert(self.inner.start_fetch()).clone(),
            }
        };
        fetch.await
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is consistent after every statement, so a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a fetch on a task of its own, so it completes (and lands in the cache) even when the
    /// requests waiting for it go away. The caller records it in `state.fetching`, under the lock
    /// the task needs to settle, so the task cannot finish before it is recorded.
    fn start_fetch(self: &Arc<Self>) -> Fetch {
        let inner = self.clone();
        let task = tokio::spawn(async move {
            let started = (inner.now)();
            let result = inner.source.fetch().await;
            inner.settle(started, result)
        });
        let this = self.clone();
        async move {
            task.await.unwrap_or_else(|_| {
                this.lock().fetching = None;
                Err(IdentityError::Interrupted)
            })
        }
        .boxed()
        .shared()
    }

    fn settle(&self, started: Instant, result: Result<AccessToken, IdentityError>) -> TokenResult {
        let provider = self.source.provider();
        let result = result.and_then(|token| {
            let mut header = HeaderValue::try_from(format!("Bearer {}", token.secret.expose())).map_err(|_| {
                IdentityError::BadAnswer { provider, detail: "the token is not valid in an HTTP header".to_owned() }
            })?;
            header.set_sensitive(true);
            Ok((header, token.expires_in))
        });
        let mut state = self.lock();
        state.fetching = None;
        match result {
            Ok((header, lifetime)) => {
                tracing::info!(
                    provider = provider_name(provider),
                    expires_in_secs = lifetime.as_secs(),
                    "got a managed identity token"
                );
                state.failure = None;
                state.token = Some(CachedToken {
                    header: header.clone(),
                    refresh_at: started + lifetime - REFRESH_BEFORE.min(lifetime / 2),
                    usable_until: started + lifetime - EXPIRY_MARGIN.min(lifetime / 10),
                });
                Ok(header)
            }
            Err(error) => {
                let backoff = state.failure.as_ref().map_or(FIRST_BACKOFF, |f| (f.backoff * 2).min(MAX_BACKOFF));
                tracing::warn!(
                    provider = provider_name(provider), error = %error, retry_in_ms = backoff.as_millis() as u64,
                    still_valid_token = state.token.as_ref().is_some_and(|t| (self.now)() < t.usable_until),
                    "could not get a managed identity token"
                );
                state.failure = Some(Failure { error: error.clone(), retry_at: (self.now)() + backoff, backoff });
                Err(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::Semaphore;

    use super::*;
    use crate::upstream::identity::Secret;

    /// Answers from a script; with a gate, each fetch waits for a permit, so a test can hold a
    /// fetch in flight.
    struct ScriptedSource {
        answers: Mutex<VecDeque<Result<AccessToken, IdentityError>>>,
        calls: AtomicUsize,
        gate: Option<Arc<Semaphore>>,
    }

    impl ScriptedSource {
        async fn fetch(&self) -> Result<AccessToken, IdentityError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                gate.acquire().await.expect("gate").forget();
            }
            self.answers.lock().expect("answers").pop_front().expect("a scripted answer")
        }
    }

    fn token(name: &str, secs: u64) -> Result<AccessToken, IdentityError> {
        Ok(AccessToken { secret: Secret::new(name), expires_in: Duration::from_secs(secs) })
    }

    fn refused() -> Result<AccessToken, IdentityError> {
        Err(IdentityError::Refused {
            provider: IdentityProvider::Imds,
            status: 400,
            description: "Identity not found".to_owned(),
        })
    }

    struct Harness {
        cache: Arc<TokenCache>,
        source: Arc<ScriptedSource>,
        clock: Arc<Mutex<Instant>>,
        gate: Arc<Semaphore>,
    }

    /// The cache's handle on a source the test keeps too, to count its calls and script it.
    struct Counted(Arc<ScriptedSource>);

    #[async_trait::async_trait]
    impl TokenSource for Counted {
        fn provider(&self) -> IdentityProvider {
            IdentityProvider::Imds
        }
        async fn fetch(&self) -> Result<AccessToken, IdentityError> {
            self.0.fetch().await
        }
    }

    fn harness(answers: Vec<Result<AccessToken, IdentityError>>, gated: bool) -> Harness {
        let gate = Arc::new(Semaphore::new(0));
        let source = Arc::new(ScriptedSource {
            answers: Mutex::new(answers.into()),
            calls: AtomicUsize::new(0),
            gate: gated.then(|| gate.clone()),
        });
        let clock = Arc::new(Mutex::new(Instant::now()));
        let now = clock.clone();
        let cache =
            TokenCache::with_clock(Box::new(Counted(source.clone())), Arc::new(move || *now.lock().expect("clock")));
        Harness { cache: Arc::new(cache), source, clock, gate }
    }

    impl Harness {
        fn advance(&self, by: Duration) {
            *self.clock.lock().expect("clock") += by;
        }

        fn calls(&self) -> usize {
            self.source.calls.load(Ordering::SeqCst)
        }

        async fn wait_calls(&self, n: usize) {
            tokio::time::timeout(Duration::from_secs(10), async {
                while self.calls() < n {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("the source was called in time");
        }

        async fn get(&self) -> Result<String, IdentityError> {
            self.cache.authorization().await.map(|h| h.to_str().expect("ascii").to_owned())
        }
    }

    #[tokio::test]
    async fn concurrent_requests_without_a_token_share_one_fetch() {
        let h = harness(vec![token("t1", 3600)], true);
        let waiters: Vec<_> = (0..20)
            .map(|_| {
                let cache = h.cache.clone();
                tokio::spawn(async move { cache.authorization().await })
            })
            .collect();
        h.wait_calls(1).await;
        h.gate.add_permits(1);
        for waiter in waiters {
            assert_eq!(waiter.await.expect("task").expect("token"), "Bearer t1");
        }
        assert_eq!(h.get().await.expect("token"), "Bearer t1");
        assert_eq!(h.calls(), 1);
        assert!(h.cache.authorization().await.expect("token").is_sensitive());
    }

    #[tokio::test]
    async fn refresh_runs_once_in_the_background_while_the_valid_token_is_used() {
        let h = harness(vec![token("t1", 3600), token("t2", 3600)], true);
        h.gate.add_permits(1);
        assert_eq!(h.get().await.expect("token"), "Bearer t1");
        h.advance(Duration::from_secs(3600 - 301));
        assert_eq!(h.get().await.expect("token"), "Bearer t1");
        assert_eq!(h.calls(), 1, "not due before 5 minutes ahead of expiry");

        h.advance(Duration::from_secs(2));
        // The refresh is held at the source: requests neither wait nor start another one.
        for _ in 0..5 {
            assert_eq!(h.get().await.expect("token"), "Bearer t1");
        }
        h.wait_calls(2).await;
        assert_eq!(h.calls(), 2);
        h.gate.add_permits(1);
        // Past t1's usable life, the answer is t2 whether the refresh has landed yet or not.
        h.advance(Duration::from_secs(290));
        assert_eq!(h.get().await.expect("token"), "Bearer t2");
        assert_eq!(h.calls(), 2);
    }

    #[tokio::test]
    async fn short_lived_tokens_refresh_at_half_life_and_stop_before_expiry() {
        let h = harness(vec![token("t1", 10), token("t2", 10), token("t3", 10)], false);
        assert_eq!(h.get().await.expect("token"), "Bearer t1");
        h.advance(Duration::from_millis(4900));
        assert_eq!(h.get().await.expect("token"), "Bearer t1");
        assert_eq!(h.calls(), 1, "a 10 s token is not due before half its life");
        // 9.05 s into a 10 s life: inside the last tenth, so the request waits for a new token.
        h.advance(Duration::from_millis(4150));
        assert_eq!(h.get().await.expect("token"), "Bearer t2");
        assert_eq!(h.calls(), 2);
        // Half of t2's life later, a request starts the refresh and still gets t2.
        h.advance(Duration::from_millis(5100));
        assert_eq!(h.get().await.expect("token"), "Bearer t2");
        h.wait_calls(3).await;
    }

    #[tokio::test]
    async fn failures_are_not_cached_as_tokens_and_retries_back_off() {
        let h = harness(vec![refused(), refused(), token("t1", 3600)], false);
        let error = h.get().await.expect_err("refused");
        assert_eq!(error.to_string(), "the IMDS identity endpoint answered 400: Identity not found");
        // Within the backoff the error comes back without a call.
        assert_eq!(h.get().await.expect_err("backoff"), error);
        assert_eq!(h.calls(), 1);
        h.advance(FIRST_BACKOFF);
        assert!(h.get().await.is_err());
        assert_eq!(h.calls(), 2);
        // The backoff doubled.
        h.advance(FIRST_BACKOFF);
        assert!(h.get().await.is_err());
        assert_eq!(h.calls(), 2);
        h.advance(FIRST_BACKOFF);
        assert_eq!(h.get().await.expect("token"), "Bearer t1");
        assert_eq!(h.calls(), 3);
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_the_valid_token() {
        let h = harness(vec![token("t1", 3600), refused(), token("t2", 3600)], false);
        assert_eq!(h.get().await.expect("token"), "Bearer t1");
        h.advance(Duration::from_secs(3400));
        assert_eq!(h.get().await.expect("token"), "Bearer t1");
        h.wait_calls(2).await;
        // Wait for the failure to land: then a request inside the backoff starts no fetch.
        tokio::time::timeout(Duration::from_secs(10), async {
            while h.cache.inner.lock().failure.is_none() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the failed refresh settled");
        assert_eq!(h.get().await.expect("token"), "Bearer t1");
        assert_eq!(h.calls(), 2);
        h.advance(FIRST_BACKOFF);
        assert_eq!(h.get().await.expect("still t1 while t2 is fetched"), "Bearer t1");
        h.wait_calls(3).await;
        h.advance(Duration::from_secs(200));
        assert_eq!(h.get().await.expect("token"), "Bearer t2");
    }
}
