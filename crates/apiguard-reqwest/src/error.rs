//! The guard's errors as `reqwest_middleware::Error`s.

use apiguard::{BoxError, BudgetExhausted, CircuitOpen, RateLimited, RetriesExhausted};
use reqwest_middleware::Error;
use tower::timeout::error::Elapsed;

/// Turns what the guard returned into the error reqwest-middleware users
/// match on: reqwest's own errors stay `Error::Reqwest` (or whatever the
/// rest of the chain returned), and every apiguard refusal becomes
/// `Error::Middleware` holding the refusal itself, so that
/// `anyhow::Error::downcast_ref::<CircuitOpen>()` finds it.
pub(crate) fn from_guard(err: BoxError) -> Error {
    let err = match err.downcast::<Error>() {
        Ok(e) => return *e,
        Err(e) => e,
    };
    let err = match err.downcast::<reqwest::Error>() {
        Ok(e) => return Error::Reqwest(*e),
        Err(e) => e,
    };
    // `anyhow` can only be asked for the type it was built from, so each
    // refusal is unboxed first.
    macro_rules! concrete {
        ($err:ident, $($ty:ty),+) => {
            $(let $err = match $err.downcast::<$ty>() {
                Ok(e) => return Error::middleware(*e),
                Err(e) => e,
            };)+
        };
    }
    concrete!(
        err,
        RateLimited,
        CircuitOpen,
        BudgetExhausted,
        RetriesExhausted,
        Elapsed
    );
    Error::Middleware(anyhow::Error::from_boxed(err))
}
