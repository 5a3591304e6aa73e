//! The admin API, `/admin/*`: `GET /admin/chargeback`, behind an admin key (`[admin]`) that is
//! never a subscription key. Without an admin key every `/admin/*` route answers 403, saying how
//! to enable it.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use http::{HeaderMap, HeaderValue, header};

use crate::error::GatewayError;
use crate::ledger::Ledger;
use crate::ledger::chargeback::{self, Asker, Prices, Report};
use crate::subscription::{KeyDigest, bearer_key, header_key};

struct Admin {
    key: KeyDigest,
    ledger: Arc<Ledger>,
    prices: Prices,
}

/// The `/admin` routes: the chargeback query with a key, a 403 everywhere without one.
pub fn routes(key: Option<KeyDigest>, ledger: Arc<Ledger>, prices: Prices) -> Router {
    let Some(key) = key else {
        let disabled = any(|| async { GatewayError::AdminApiDisabled });
        return Router::new().route("/admin", disabled.clone()).route("/admin/{*rest}", disabled);
    };
    Router::new().route("/admin/chargeback", get(chargeback)).with_state(Arc::new(Admin { key, ledger, prices }))
}

impl Admin {
    /// The key as `Authorization: Bearer <key>` or `api-key: <key>`.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), GatewayError> {
        let presented = bearer_key(headers).or_else(|| header_key(headers, "api-key"));
        match presented {
            None => Err(GatewayError::MissingAdminKey),
            Some(key) if self.key.matches(key) => Ok(()),
            Some(_) => Err(GatewayError::InvalidAdminKey),
        }
    }
}

async fn chargeback(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, GatewayError> {
    admin.authorize(&headers)?;
    let Query(params) = params.map_err(|_| GatewayError::invalid("The query string could not be decoded.", None))?;
    let query = chargeback::Query::parse(
        params.iter().map(|(name, value)| (name.as_str(), value.as_str())),
        Asker::Http,
        jiff::Timestamp::now(),
    )
    .map_err(|e| GatewayError::InvalidRequest { message: e.message, param: Some(e.param) })?;
    let (from, to) = query.hours();
    let buckets = admin
        .ledger
        .store()
        .query(from, to)
        .await
        .map_err(|e| GatewayError::LedgerUnavailable { detail: e.to_string() })?;
    let (content_type, body) = Report::new(&query, &buckets, &admin.prices).render();
    let mut response = body.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}
