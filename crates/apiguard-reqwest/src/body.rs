//! The request body as the guard sees it: reqwest's body, copied for a
//! retry when it is in memory.

use apiguard::retry::TryCloneBody;
use reqwest::Body;

/// A reqwest body the guard can copy for a retry: a body held in memory
/// (bytes, a string, JSON, a form) is copied; a streaming body cannot be,
/// so its request is sent once and never retried.
#[derive(Debug)]
pub(crate) struct GuardBody(pub(crate) Body);

impl TryCloneBody for GuardBody {
    fn try_clone_body(&self) -> Option<Self> {
        // reqwest's own `try_clone` is crate-private; `as_bytes` is the
        // public view of the same in-memory body.
        self.0
            .as_bytes()
            .map(|bytes| GuardBody(Body::from(bytes.to_vec())))
    }
}
