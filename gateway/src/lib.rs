//! aigw: an AI gateway that reproduces API Management's AI policy chain in front of OpenAI-compatible
//! and Azure OpenAI backends.
//!
//! A request's path: `server` (routes, request id) builds the `context`, then the API's
//! `policy::pipeline` runs the inbound policies, reads the body (`proxy::body`, validated by
//! `protocol`), sends it (`proxy::failover` over `upstream`: pools, circuit breakers, backends),
//! hands the answer back (`proxy::forward`, or `proxy::relay` for a stream) through the outbound
//! policies, and completes it off the response path (accounting, `ledger`, `metrics`,
//! `access_log`). `app` builds all of it from `config`, choosing Redis or memory once for
//! `limits`, `cache` and `ledger`; `infra` holds the clock, the Redis connection and breaker.
//! The README's "Layout" section has the same path with the context field each step writes.

pub mod access_log;
pub mod admin;
pub mod app;
pub mod cache;
pub mod client_ip;
pub mod config;
pub mod connection;
pub mod context;
pub mod embed;
pub mod error;
#[cfg(test)]
pub(crate) mod harness;
pub mod infra;
pub mod key_guessing;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod quickstart;
pub mod server;
pub mod subscription;
pub mod upstream;
