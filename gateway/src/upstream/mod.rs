//! Where requests go: backends, pools of them, their circuit breakers and credentials.

pub mod backend;
pub mod circuit;
pub mod identity;
pub mod pool;
