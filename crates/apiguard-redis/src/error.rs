//! Error types.

use apiguard_core::InvalidConfig;

/// Building a Redis-backed limiter or signal failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration was refused (see [`InvalidConfig::field`]).
    #[error(transparent)]
    Config(#[from] InvalidConfig),
    /// Redis could not be reached, or refused to load the script.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl BuildError {
    /// Whether the configuration was refused.
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Config(_))
    }

    /// Whether Redis was unreachable or failed.
    pub fn is_redis(&self) -> bool {
        matches!(self, Self::Redis(_))
    }
}
