//! What several parts of the gateway share and none owns: the one [`clock`], the [`redis`]
//! connection and the Redis [`breaker`] that keeps Redis trouble from holding requests up.

pub mod breaker;
pub mod clock;
pub mod redis;
