//! `set-backend-service`: sends the request to a named backend or pool instead of the API's default.

use async_trait::async_trait;

use super::{Flow, Policy};
use crate::context::RequestContext;
use crate::error::GatewayError;
use crate::upstream::pool::Target;

pub struct SetBackendService {
    pub target: Target,
}

#[async_trait]
impl Policy for SetBackendService {
    async fn inbound(&self, ctx: &mut RequestContext) -> Result<Flow, GatewayError> {
        ctx.target = Some(self.target.clone());
        Ok(Flow::Continue)
    }
}
