//! Error types.
//!
//! The retry layer's error type is [`BoxError`]. What comes out when
//! retrying stops on an error:
//!
//! - [`RetriesExhausted`] — the retries (or the deadline) ran out; carries
//!   the attempts made and the last error (also its `source()`);
//! - [`BudgetExhausted`] — the retry budget refused the retry;
//! - the error itself — it is not retried (see the crate docs), the request
//!   may not be repeated, or it is an inner refusal ([`RateLimited`],
//!   [`CircuitOpen`]) whose wait does not fit `max_retry_after` or the
//!   deadline.
//!
//! [`NotReplayable`] is the body error of a replay copy read after its
//! recording was dropped.

pub use crate::body::NotReplayable;
pub use apiguard_core::{
    BoxError, BudgetExhausted, CircuitOpen, InvalidConfig, RateLimited, RetriesExhausted,
};
