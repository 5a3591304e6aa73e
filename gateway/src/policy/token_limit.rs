//! `token-limit`: API Management's llm-token-limit. Tokens per minute over a sliding window and
//! a token quota per calendar period, counted per counter key (the subscription by default),
//! shared by every instance through the counter store.
//!
//! Reserve-then-reconcile: before the backend is called, the estimated prompt tokens plus the
//! expected completion (`max_tokens`, else `default-completion-tokens`) are reserved in both
//! windows in one atomic step, so concurrent requests cannot all slip under the limit. When the
//! exchange is complete the reservation is replaced by the real usage, or given back if the call
//! failed, was answered without the backend, or its usage is unknown.

use std::sync::Arc;

use async_trait::async_trait;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::{Flow, Policy, template::Template};
use crate::config::{OnStoreFailure, QuotaPeriod, TokenLimitConfig};
use crate::context::{Payload, RequestBody, RequestContext, Reservation};
use crate::error::GatewayError;
use crate::limits::{Admission, Counters, Limit, Period, Window};
use crate::protocol::tokens::{PromptKind, TokenEstimator};

pub struct TokenLimit {
    id: usize,
    counters: Arc<Counters>,
    key: Template,
    per_minute: Option<u64>,
    quota: Option<(u64, Period)>,
    estimate_prompt: bool,
    default_completion: u64,
    remaining_header: Option<HeaderName>,
    remaining_quota_header: Option<HeaderName>,
    consumed_header: Option<HeaderName>,
    on_failure: OnStoreFailure,
}

fn header(name: &Option<String>) -> Result<Option<HeaderName>, String> {
    name.as_deref().map(|n| HeaderName::try_from(n).map_err(|_| format!("not a header name: {n:?}"))).transpose()
}

impl TokenLimit {
    pub fn new(id: usize, config: &TokenLimitConfig, counters: Arc<Counters>) -> Result<Self, String> {
        if config.estimate_prompt_tokens {
            TokenEstimator::global().warm_up();
        }
        let period = |p: QuotaPeriod| match p {
            QuotaPeriod::Hourly => Period::Hourly,
            QuotaPeriod::Daily => Period::Daily,
            QuotaPeriod::Weekly => Period::Weekly,
            QuotaPeriod::Monthly => Period::Monthly,
            QuotaPeriod::Yearly => Period::Yearly,
        };
        Ok(Self {
            id,
            counters,
            key: Template::parse(&config.counter_key)?,
            per_minute: config.tokens_per_minute,
            quota: config.token_quota.zip(config.token_quota_period.map(period)),
            estimate_prompt: config.estimate_prompt_tokens,
            default_completion: config.default_completion_tokens,
            remaining_header: header(&config.remaining_tokens_header)?,
            remaining_quota_header: header(&config.remaining_quota_tokens_header)?,
            consumed_header: header(&config.tokens_consumed_header)?,
            on_failure: config.on_store_failure,
        })
    }

    /// Tokens to reserve: the prompt's estimate and the completion the request may produce.
    async fn cost(&self, ctx: &RequestContext) -> u64 {
        let (kind, body, completion) = match ctx.payload() {
            Some(Payload::Chat(chat)) => {
                (PromptKind::Chat, &chat.body, chat.max_tokens.unwrap_or(self.default_completion))
            }
            Some(Payload::Embeddings(embeddings)) => (PromptKind::Embeddings, &embeddings.body, 0),
            _ => return 1,
        };
        let prompt = if self.estimate_prompt {
            let body_len = match &ctx.request.body {
                RequestBody::Read { raw, .. } => raw.len(),
                RequestBody::Unread => 0,
            };
            TokenEstimator::global().prompt_tokens_off_worker(kind, ctx.model(), body, body_len).await
        } else {
            0
        };
        // A reservation of nothing would let a caller already at the limit through.
        (prompt + completion).max(1)
    }

    fn limits(&self, key: &str) -> Vec<Limit> {
        let mut limits = Vec::with_capacity(2);
        if let Some(max) = self.per_minute {
            limits.push(Limit {
                key: format!("aigw:{{{key}}}:tokens:minute"),
                window: Window::Sliding { secs: 60 },
                max,
            });
        }
        if let Some((max, period)) = self.quota {
            let key = format!("aigw:{{{key}}}:tokens:{}", period.name());
            limits.push(Limit { key, window: Window::Fixed(period), max });
        }
        limits
    }
}

#[async_trait]
impl Policy for TokenLimit {
    async fn inbound(&self, ctx: &mut RequestContext) -> Result<Flow, GatewayError> {
        let cost = self.cost(ctx).await;
        let limits = self.limits(&self.key.render(ctx));
        let (admission, source) = self
            .counters
            .reserve(&limits, cost, self.on_failure)
            .await
            .map_err(|_| GatewayError::LimitStoreUnavailable)?;
        let is_minute = |i: usize| self.per_minute.is_some() && i == 0;
        match admission {
            Admission::Granted { ticket, remaining } => {
                ctx.reservations.push(Reservation { policy: self.id, ticket, source, remaining });
                Ok(Flow::Continue)
            }
            Admission::Refused { limit, retry_after_secs } if is_minute(limit) => {
                Err(GatewayError::TokenLimitExceeded { retry_after_secs })
            }
            Admission::Refused { retry_after_secs, .. } => Err(GatewayError::TokenQuotaExceeded { retry_after_secs }),
            Admission::TooLarge { limit } => {
                Err(GatewayError::TokensOverLimit { needed: cost, max: limits[limit].max })
            }
        }
    }

    fn response_headers(&self, ctx: &RequestContext, headers: &mut HeaderMap) {
        let Some(reservation) = ctx.reservation(self.id) else { return };
        // With a JSON answer the real usage is known already; a stream's is known only at its end.
        let used = ctx.usage.map(|u| u.total_tokens);
        let left = |remaining: u64| match used {
            Some(used) => (remaining + reservation.ticket.reserved).saturating_sub(used),
            None => remaining,
        };
        let mut remaining = reservation.remaining.iter().copied();
        let minute = self.per_minute.and_then(|_| remaining.next());
        let quota = self.quota.and_then(|_| remaining.next());
        let values = [
            (&self.remaining_header, minute.map(left)),
            (&self.remaining_quota_header, quota.map(left)),
            (&self.consumed_header, used),
        ];
        for (name, value) in values {
            if let (Some(name), Some(value)) = (name, value) {
                headers.insert(name.clone(), HeaderValue::from(value));
            }
        }
    }

    async fn completed(&self, ctx: &RequestContext) {
        let Some(reservation) = ctx.reservation(self.id) else { return };
        let succeeded = (200..300).contains(&ctx.outcome.status);
        let actual = ctx.usage.filter(|_| succeeded).map_or(0, |u| u.total_tokens);
        self.counters.adjust(&reservation.ticket, actual, reservation.source).await;
    }
}

#[cfg(test)]
mod tests {
    use crate::harness::{Harness, StubBackend};

    const USED: u64 = StubBackend::PROMPT_TOKENS + StubBackend::COMPLETION_TOKENS;

    /// Each request reserves its `max_tokens` (no prompt estimate here), is reconciled to the
    /// backend's usage once complete, and is refused when the reservation no longer fits.
    #[tokio::test]
    async fn reserves_reconciles_and_refuses() {
        let gw = Harness::start(
            r#"
            [apis.chat]
            kind = "openai"
            backend = "stub"
            inbound = [{ policy = "token-limit", tokens-per-minute = 50, estimate-prompt-tokens = false,
                         remaining-tokens-header = "x-remaining", tokens-consumed-header = "x-consumed" }]
            "#,
        )
        .await;
        // Each chat asks for max_tokens = 20.
        let mut used = 0;
        for _ in 0..3 {
            let answer = gw.chat(&[]).await;
            assert_eq!(answer.status, 200, "{}", answer.body);
            used += USED;
            assert_eq!(answer.header("x-consumed"), Some(USED.to_string().as_str()));
            assert_eq!(answer.header("x-remaining"), Some((50 - used).to_string().as_str()));
        }
        // 36 used: 20 more do not fit in 50.
        let refused = gw.chat(&[]).await;
        assert_eq!(refused.status, 429);
        assert_eq!(refused.body["error"]["code"], "token_limit_exceeded");
        assert!(refused.header("retry-after").is_some());
        assert_eq!(gw.backend.received().len(), 3, "a refused request never reaches the backend");
    }

    /// A request that could never fit is refused as such, not as "try later".
    #[tokio::test]
    async fn a_request_larger_than_the_limit_is_refused_outright() {
        let gw = Harness::start(
            r#"
            [apis.chat]
            kind = "openai"
            backend = "stub"
            inbound = [{ policy = "token-limit", tokens-per-minute = 10, estimate-prompt-tokens = false }]
            "#,
        )
        .await;
        let answer = gw.chat(&[]).await;
        assert_eq!(answer.status, 429);
        assert_eq!(answer.body["error"]["code"], "tokens_over_limit");
        assert!(gw.backend.received().is_empty());
    }
}
