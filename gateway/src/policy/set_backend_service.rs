//! `set-backend-service`: sends the request to a named backend instead of the API's default.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Flow, Policy};
use crate::backend::Backend;
use crate::context::RequestContext;
use crate::error::GatewayError;

pub struct SetBackendService {
    pub backend: Arc<Backend>,
}

#[async_trait]
impl Policy for SetBackendService {
    async fn inbound(&self, ctx: &mut RequestContext) -> Result<Flow, GatewayError> {
        ctx.backend = Some(self.backend.clone());
        Ok(Flow::Continue)
    }
}
