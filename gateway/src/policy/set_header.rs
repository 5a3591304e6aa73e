//! `set-header`: in inbound, edits a header of the request the backend gets; in outbound and
//! on-error, a header of the response the client gets. Like API Management's policy, with
//! `exists-action` override (default), skip, append or delete.
//!
//! Backend credentials cannot be set this way: credential headers are removed from the backend
//! request and replaced by the backend's own auth.

use async_trait::async_trait;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::{Flow, Policy, ResponseHead, template::Template};
use crate::config::{ExistsAction, SetHeaderConfig};
use crate::context::RequestContext;
use crate::error::GatewayError;

pub struct SetHeader {
    name: HeaderName,
    value: Option<Template>,
    action: ExistsAction,
}

impl SetHeader {
    pub fn new(config: &SetHeaderConfig) -> Result<Self, String> {
        let name =
            HeaderName::try_from(config.name.as_str()).map_err(|_| format!("not a header name: {:?}", config.name))?;
        let value = config.value.as_deref().map(Template::parse).transpose()?;
        if value.is_none() && config.exists_action != ExistsAction::Delete {
            return Err("a value is required unless exists-action is \"delete\"".to_owned());
        }
        Ok(Self { name, value, action: config.exists_action })
    }

    fn apply(&self, ctx: &RequestContext, headers: &mut HeaderMap) {
        if self.action == ExistsAction::Delete {
            headers.remove(&self.name);
            return;
        }
        if self.action == ExistsAction::Skip && headers.contains_key(&self.name) {
            return;
        }
        let rendered = self.value.as_ref().map(|t| t.render(ctx)).unwrap_or_default();
        // A rendered value can only be invalid through request-controlled text (a header value
        // with control characters); such a value is left out rather than failing the request.
        let Ok(value) = HeaderValue::try_from(rendered) else { return };
        if self.action == ExistsAction::Append {
            headers.append(self.name.clone(), value);
        } else {
            headers.insert(self.name.clone(), value);
        }
    }
}

#[async_trait]
impl Policy for SetHeader {
    async fn inbound(&self, ctx: &mut RequestContext) -> Result<Flow, GatewayError> {
        let mut headers = std::mem::take(&mut ctx.request.headers);
        self.apply(ctx, &mut headers);
        ctx.request.headers = headers;
        Ok(Flow::Continue)
    }

    async fn outbound(&self, ctx: &mut RequestContext, response: &mut ResponseHead) -> Result<(), GatewayError> {
        self.apply(ctx, &mut response.headers);
        Ok(())
    }

    async fn on_error(&self, ctx: &mut RequestContext, _error: &GatewayError, response: &mut ResponseHead) {
        self.apply(ctx, &mut response.headers);
    }
}
