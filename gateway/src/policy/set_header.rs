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

#[cfg(test)]
mod tests {
    use crate::harness::Harness;

    /// Inbound set-header edits what the backend gets, for each exists-action.
    #[tokio::test]
    async fn inbound_exists_actions_edit_the_backend_request() {
        let gw = Harness::start(
            r#"
            [apis.chat]
            kind = "openai"
            backend = "stub"
            inbound = [
                { policy = "set-header", name = "x-new", value = "{subscription.team}" },
                { policy = "set-header", name = "x-override", value = "gateway" },
                { policy = "set-header", name = "x-skip", value = "gateway", exists-action = "skip" },
                { policy = "set-header", name = "x-append", value = "gateway", exists-action = "append" },
                { policy = "set-header", name = "x-delete", exists-action = "delete" },
            ]
            "#,
        )
        .await;
        let answer = gw
            .chat(&[("x-override", "client"), ("x-skip", "client"), ("x-append", "client"), ("x-delete", "client")])
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        let got = gw.backend.last().headers;
        let all =
            |name: &str| got.get_all(name).iter().map(|v| v.to_str().expect("text").to_owned()).collect::<Vec<_>>();
        assert_eq!(all("x-new"), ["team-a"]);
        assert_eq!(all("x-override"), ["gateway"]);
        assert_eq!(all("x-skip"), ["client"]);
        assert_eq!(all("x-append"), ["client", "gateway"]);
        assert!(all("x-delete").is_empty());
    }

    /// Outbound set-header edits the client's response; on-error edits the error response.
    #[tokio::test]
    async fn outbound_and_on_error_edit_the_response() {
        let gw = Harness::start(
            r#"
            [apis.chat]
            kind = "openai"
            backend = "stub"
            outbound = [{ policy = "set-header", name = "x-team", value = "{subscription.team}" }]
            on-error = [{ policy = "set-header", name = "x-error-api", value = "{api.id}" }]
            "#,
        )
        .await;
        let answer = gw.chat(&[]).await;
        assert_eq!(answer.header("x-team"), Some("team-a"));
        assert_eq!(answer.header("x-error-api"), None);

        let refused = gw
            .send(http::Request::post("/v1/chat/completions").body(axum::body::Body::empty()).expect("request"))
            .await;
        assert_eq!(refused.status(), 401);
        assert_eq!(refused.headers().get("x-error-api").expect("on-error header"), "chat");
        assert!(refused.headers().get("x-team").is_none());
    }
}
