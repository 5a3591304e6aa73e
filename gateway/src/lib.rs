//! aigw: an AI gateway that reproduces API Management's AI policy chain in front of OpenAI-compatible
//! and Azure OpenAI backends. `server` is the front door, `policy` the pipeline each request runs
//! through, `config` the document that declares it all.

pub mod access_log;
pub mod admin;
pub mod backend;
pub mod cache;
pub mod circuit;
pub mod client_ip;
pub mod config;
pub mod connection;
pub mod context;
pub mod embed;
pub mod error;
pub mod identity;
pub mod key_guessing;
pub mod ledger;
pub mod metrics;
pub mod openai;
pub mod policy;
pub mod pool;
pub mod quickstart;
pub mod server;
pub mod sse;
pub mod store;
pub mod subscription;
pub mod tokens;
