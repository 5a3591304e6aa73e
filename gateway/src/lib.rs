//! aigw: an AI gateway that reproduces API Management's AI policy chain in front of OpenAI-compatible
//! and Azure OpenAI backends. `server` is the front door, `policy` the pipeline each request runs
//! through, `config` the document that declares it all.

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
