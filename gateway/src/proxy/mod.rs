//! The proxy engine: what happens to a request between the inbound and the outbound policies,
//! and to a response after them. It knows HTTP and backends, not policies.
//!
//! - [`body`]: reads the client's body once, bounded by `server.max-body-bytes`;
//! - [`failover`]: sends the request to the target's backends until one answers usefully;
//! - [`forward`]: the backend's response head as the client gets it, and its body as bytes or
//!   as a stream to relay;
//! - [`relay`]: moves a streamed response to the client, reading the backend to its end.

pub mod body;
pub mod failover;
pub mod forward;
pub mod relay;
