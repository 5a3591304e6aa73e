//! `set-variable`: API Management's set-variable. Sets a named value, a template, for the policies
//! after it in the same request, which read it as `{variable.<name>}`. Usable in inbound,
//! outbound and on-error.
//!
//! Start-up refuses any template that reads a variable no set-variable sets before it in the
//! API's pipeline order (inbound in order, then outbound, then on-error), so a variable is never
//! silently empty in a counter key or a cache partition. The one case left is on-error after a
//! failure before the set-variable ran: there the variable renders empty (only headers and
//! metric dimensions render in on-error, no keys).

use async_trait::async_trait;

use super::{Flow, Policy, ResponseHead, template::Template};
use crate::config::SetVariableConfig;
use crate::context::RequestContext;
use crate::error::GatewayError;

pub struct SetVariable {
    name: String,
    value: Template,
}

impl SetVariable {
    pub fn new(config: &SetVariableConfig) -> Result<Self, String> {
        Ok(Self { name: config.name.clone(), value: Template::parse(&config.value)? })
    }

    fn apply(&self, ctx: &mut RequestContext) {
        let value = self.value.render(ctx);
        ctx.variables.insert(self.name.clone(), value);
    }
}

#[async_trait]
impl Policy for SetVariable {
    fn reads_body(&self) -> bool {
        self.value.reads_body()
    }

    async fn inbound(&self, ctx: &mut RequestContext) -> Result<Flow, GatewayError> {
        self.apply(ctx);
        Ok(Flow::Continue)
    }

    async fn outbound(&self, ctx: &mut RequestContext, _response: &mut ResponseHead) -> Result<(), GatewayError> {
        self.apply(ctx);
        Ok(())
    }

    async fn on_error(&self, ctx: &mut RequestContext, _error: &GatewayError, _response: &mut ResponseHead) {
        self.apply(ctx);
    }
}
