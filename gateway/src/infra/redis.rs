//! The Redis connection every Redis user shares the shape of (the counter store, the semantic
//! cache, the ledger): lazy, bounded by a short timeout, reconnecting with a capped back-off.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// The client for `url` and a connection to it that connects on first use, so the gateway starts
/// while Redis is down; every call is bounded by `timeout`, and reconnects back off up to `cooldown`.
pub fn lazy_connection(
    url: &str,
    timeout: Duration,
    cooldown: Duration,
) -> Result<(redis::Client, ConnectionManager), String> {
    let client = redis::Client::open(url).map_err(|e| format!("invalid Redis URL: {:?}", e.kind()))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(cooldown);
    let connection = ConnectionManager::new_lazy_with_config(client.clone(), config)
        .map_err(|e| format!("cannot set up the Redis connection: {:?}", e.kind()))?;
    Ok((client, connection))
}
