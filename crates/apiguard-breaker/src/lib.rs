//! apiguard breaker (work in progress).
