//! `rate-limit-by-key` (calls per renewal period over a sliding window, 429) and `quota-by-key`
//! (calls per fixed renewal period, 403): API Management's call limits, for the agent and MCP APIs
//! as much as for models. Each call counts once, when it is admitted.

use std::sync::Arc;

use async_trait::async_trait;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::{Flow, Policy, template::Template};
use crate::config::{CallLimitConfig, OnStoreFailure};
use crate::context::{RequestContext, Reservation};
use crate::error::GatewayError;
use crate::limits::{Admission, Counters, Limit, Period, Window};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallLimitKind {
    /// rate-limit-by-key: sliding window, 429.
    Rate,
    /// quota-by-key: fixed periods, 403.
    Quota,
}

pub struct CallLimit {
    id: usize,
    kind: CallLimitKind,
    counters: Arc<Counters>,
    key: Template,
    limit: Limit,
    remaining_header: Option<HeaderName>,
    on_failure: OnStoreFailure,
}

impl CallLimit {
    pub fn new(
        id: usize,
        kind: CallLimitKind,
        config: &CallLimitConfig,
        counters: Arc<Counters>,
    ) -> Result<Self, String> {
        let (window, name) = match kind {
            CallLimitKind::Rate => (Window::Sliding { secs: config.renewal_period }, "rate"),
            CallLimitKind::Quota => (Window::Fixed(Period::Seconds(config.renewal_period)), "quota"),
        };
        let remaining_header = config
            .remaining_calls_header
            .as_deref()
            .map(|n| HeaderName::try_from(n).map_err(|_| format!("not a header name: {n:?}")))
            .transpose()?;
        Ok(Self {
            id,
            kind,
            counters,
            key: Template::parse(&config.counter_key)?,
            // The key itself is filled in per request; the rest is fixed.
            limit: Limit { key: format!(":calls:{name}:{}", config.renewal_period), window, max: config.calls },
            remaining_header,
            on_failure: config.on_store_failure,
        })
    }
}

#[async_trait]
impl Policy for CallLimit {
    fn reads_body(&self) -> bool {
        self.key.reads_body()
    }

    async fn inbound(&self, ctx: &mut RequestContext) -> Result<Flow, GatewayError> {
        let limit = Limit { key: format!("aigw:{{{}}}{}", self.key.render(ctx), self.limit.key), ..self.limit.clone() };
        let (admission, source) = self
            .counters
            .reserve(std::slice::from_ref(&limit), 1, self.on_failure)
            .await
            .map_err(|_| GatewayError::LimitStoreUnavailable)?;
        match (admission, self.kind) {
            (Admission::Granted { ticket, remaining }, _) => {
                ctx.reservations.push(Reservation { policy: self.id, ticket, source, remaining });
                Ok(Flow::Continue)
            }
            (Admission::Refused { retry_after_secs, .. }, CallLimitKind::Rate) => {
                Err(GatewayError::RateLimitExceeded { retry_after_secs })
            }
            (Admission::Refused { retry_after_secs, .. }, CallLimitKind::Quota) => {
                Err(GatewayError::CallQuotaExceeded { retry_after_secs })
            }
            // One call never exceeds a limit of at least one call (config requires `calls` > 0).
            (Admission::TooLarge { .. }, _) => Err(GatewayError::Internal),
        }
    }

    fn response_headers(&self, ctx: &RequestContext, headers: &mut HeaderMap) {
        let remaining = ctx.reservation(self.id).and_then(|r| r.remaining.first().copied());
        if let (Some(name), Some(remaining)) = (&self.remaining_header, remaining) {
            headers.insert(name.clone(), HeaderValue::from(remaining));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::harness::Harness;

    fn api(policy: &str) -> String {
        format!(
            r#"
            [apis.chat]
            kind = "openai"
            backend = "stub"
            inbound = [{{ policy = "{policy}", calls = 2, renewal-period = 60, remaining-calls-header = "x-calls-left" }}]
            "#
        )
    }

    #[tokio::test]
    async fn rate_limit_by_key_counts_calls_and_answers_429() {
        let gw = Harness::start(&api("rate-limit-by-key")).await;
        for left in ["1", "0"] {
            let answer = gw.chat(&[]).await;
            assert_eq!(answer.status, 200, "{}", answer.body);
            assert_eq!(answer.header("x-calls-left"), Some(left));
        }
        let refused = gw.chat(&[]).await;
        assert_eq!(refused.status, 429);
        assert_eq!(refused.body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(gw.backend.received().len(), 2);
    }

    #[tokio::test]
    async fn quota_by_key_answers_403() {
        let gw = Harness::start(&api("quota-by-key")).await;
        gw.chat(&[]).await;
        gw.chat(&[]).await;
        let refused = gw.chat(&[]).await;
        assert_eq!(refused.status, 403);
        assert_eq!(refused.body["error"]["code"], "call_quota_exceeded");
    }
}
