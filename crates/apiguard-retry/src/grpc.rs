//! gRPC's retry rules (gRFC A6): which status codes are retried, which
//! methods may be sent twice, and the server's pushback.

use std::time::Duration;

use apiguard_core::InvalidConfig;
use apiguard_core::grpc::{Code, Pushback};
use http::Response;

/// The codes retried by default: `UNAVAILABLE` alone, the one code that
/// says the call was not processed and a new attempt may well succeed.
pub const DEFAULT_GRPC_RETRYABLE_CODES: [Code; 1] = [Code::Unavailable];

/// The gRPC settings of a policy (see
/// [`RetryPolicyBuilder::grpc`](crate::RetryPolicyBuilder::grpc)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GrpcRules {
    /// A bit per retryable code.
    codes: u32,
    /// Full method paths (`/pkg.Service/Method`) or whole services
    /// (`/pkg.Service/`), sorted.
    idempotent: Vec<Box<str>>,
}

impl Default for GrpcRules {
    fn default() -> Self {
        Self::new(DEFAULT_GRPC_RETRYABLE_CODES, Vec::new())
            .unwrap_or_else(|_| unreachable!("the defaults are valid"))
    }
}

/// What a response to a gRPC call says about retrying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GrpcVerdict {
    /// Not retried: a code that is not retryable, a pushback asking for no
    /// retry, or a status still to come in the trailers (the call is
    /// committed once the response has started).
    Final,
    /// Retried, after the pushback if the server named one.
    Retry(Code, Option<Duration>),
}

impl GrpcRules {
    pub(crate) fn new(
        codes: impl IntoIterator<Item = Code>,
        methods: Vec<String>,
    ) -> Result<Self, InvalidConfig> {
        let mut bits = 0u32;
        for code in codes {
            if code == Code::Ok {
                return Err(InvalidConfig::new(
                    "grpc_retryable_codes",
                    "OK is not a failure to retry",
                ));
            }
            bits |= 1 << code.as_i32();
        }
        let mut idempotent = Vec::with_capacity(methods.len());
        for m in methods {
            let path = if m.starts_with('/') {
                m
            } else {
                format!("/{m}")
            };
            // `/pkg.Service/Method` or `/pkg.Service/`.
            let parts: Vec<&str> = path[1..].split('/').collect();
            if parts.len() != 2 || parts[0].is_empty() {
                return Err(InvalidConfig::new(
                    "grpc_idempotent_methods",
                    format!(
                        "{path:?} is not a gRPC method (`pkg.Service/Method`) or service (`pkg.Service/`)"
                    ),
                ));
            }
            idempotent.push(path.into_boxed_str());
        }
        idempotent.sort();
        Ok(Self {
            codes: bits,
            idempotent,
        })
    }

    pub(crate) fn is_retryable(&self, code: Code) -> bool {
        self.codes & (1 << code.as_i32()) != 0
    }

    /// Whether the method at `path` (`/pkg.Service/Method`) may be sent
    /// twice.
    pub(crate) fn is_idempotent(&self, path: &str) -> bool {
        self.idempotent.iter().any(|m| {
            if m.ends_with('/') {
                path.starts_with(&**m)
            } else {
                **m == *path
            }
        })
    }

    /// What `res` says (see [`GrpcVerdict`]).
    pub(crate) fn verdict<R>(&self, res: &Response<R>) -> GrpcVerdict {
        let Some(code) = Code::of_response(res) else {
            return GrpcVerdict::Final;
        };
        if !self.is_retryable(code) {
            return GrpcVerdict::Final;
        }
        match Pushback::from_headers(res.headers()) {
            Some(Pushback::DoNotRetry) => GrpcVerdict::Final,
            Some(Pushback::After(d)) => GrpcVerdict::Retry(code, Some(d)),
            None => GrpcVerdict::Retry(code, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(status: &str, pushback: Option<&str>) -> Response<()> {
        let mut b = Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", status);
        if let Some(p) = pushback {
            b = b.header("grpc-retry-pushback-ms", p);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_listed_codes_are_retried_and_pushback_is_honoured() {
        let rules = GrpcRules::default();
        assert_eq!(
            rules.verdict(&res("14", None)),
            GrpcVerdict::Retry(Code::Unavailable, None)
        );
        assert_eq!(
            rules.verdict(&res("14", Some("300"))),
            GrpcVerdict::Retry(Code::Unavailable, Some(Duration::from_millis(300)))
        );
        assert_eq!(rules.verdict(&res("14", Some("-1"))), GrpcVerdict::Final);
        assert_eq!(rules.verdict(&res("14", Some("x"))), GrpcVerdict::Final);
        assert_eq!(rules.verdict(&res("8", None)), GrpcVerdict::Final);
        assert_eq!(rules.verdict(&res("4", None)), GrpcVerdict::Final);
        // Status in the trailers: committed.
        let started = Response::builder()
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        assert_eq!(rules.verdict(&started), GrpcVerdict::Final);
        // A proxy's 503 is UNAVAILABLE.
        let proxy = Response::builder().status(503).body(()).unwrap();
        assert_eq!(
            rules.verdict(&proxy),
            GrpcVerdict::Retry(Code::Unavailable, None)
        );
    }

    #[test]
    fn idempotent_methods_by_name_or_service() {
        let rules = GrpcRules::new(
            [Code::Unavailable],
            vec!["grpc.health.v1.Health/Check".into(), "/pkg.Reads/".into()],
        )
        .unwrap();
        assert!(rules.is_idempotent("/grpc.health.v1.Health/Check"));
        assert!(!rules.is_idempotent("/grpc.health.v1.Health/Watch"));
        assert!(rules.is_idempotent("/pkg.Reads/Get"));
        assert!(!rules.is_idempotent("/pkg.Writes/Put"));
    }

    #[test]
    fn bad_settings_are_refused() {
        let e = GrpcRules::new([Code::Ok], vec![]).unwrap_err();
        assert_eq!(e.field(), "grpc_retryable_codes");
        for bad in ["Check", "/a/b/c", "/", "//Check"] {
            let e = GrpcRules::new([Code::Unavailable], vec![bad.into()]).unwrap_err();
            assert_eq!(e.field(), "grpc_idempotent_methods", "{bad}");
        }
    }
}
