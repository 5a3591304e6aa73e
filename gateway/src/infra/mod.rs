//! What several parts of the gateway share and none owns: the Redis breaker.

pub mod breaker;
