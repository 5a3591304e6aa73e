//! The protocols the gateway speaks to clients and backends.

pub mod openai;
pub mod sse;
pub mod tokens;
