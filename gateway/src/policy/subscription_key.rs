//! Subscription-key authentication, API Management style. Runs first in inbound on every API that
//! requires a subscription (the default), before the body is read, so an unauthenticated caller
//! costs no parsing. The key itself is never stored in the context, logged or echoed.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Flow, Policy};
use crate::context::RequestContext;
use crate::error::GatewayError;
use crate::key_guessing::InvalidKeyLimiter;
use crate::subscription::{SubscriptionStore, presented_key};

pub struct SubscriptionKeyAuth {
    pub store: Arc<SubscriptionStore>,
    /// Shared by every API of the gateway; `None` when switched off.
    pub invalid_keys: Option<Arc<InvalidKeyLimiter>>,
}

#[async_trait]
impl Policy for SubscriptionKeyAuth {
    fn reads_body(&self) -> bool {
        false
    }

    async fn inbound(&self, ctx: &mut RequestContext) -> Result<Flow, GatewayError> {
        let key = presented_key(&ctx.request.headers, ctx.request.query.as_deref())
            .ok_or(GatewayError::MissingSubscriptionKey)?;
        let Some(subscription) = self.store.find(&key) else {
            if let Some(limiter) = &self.invalid_keys
                && let Err(retry_after_secs) = limiter.failed_attempt(ctx.client_ip)
            {
                return Err(GatewayError::TooManyInvalidKeys { retry_after_secs });
            }
            return Err(GatewayError::InvalidSubscriptionKey);
        };
        if !subscription.may_call(&ctx.api.id) {
            // API Management answers a key of another product's subscription as an invalid key.
            tracing::info!(
                request_id = %ctx.request_id,
                subscription_id = %subscription.id,
                api = %ctx.api.id,
                "subscription is not allowed to call this API"
            );
            return Err(GatewayError::InvalidSubscriptionKey);
        }
        ctx.subscription = Some(subscription);
        Ok(Flow::Continue)
    }
}
