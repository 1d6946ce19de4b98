//! The inner service of the guard: the rest of the reqwest-middleware
//! chain, as a tower service over `http` types.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Extensions;
use reqwest::ResponseBuilderExt;
use reqwest_middleware::Next;
use tower_service::Service;

use crate::body::GuardBody;

/// The middleware chain's extensions, carried through the guard inside the
/// request's own extensions (and back inside the response's), so each
/// attempt runs the rest of the chain with its own copy.
#[derive(Clone, Debug, Default)]
pub(crate) struct ChainExtensions(pub(crate) Extensions);

/// `next.run(req, extensions)` as a tower service: what each attempt the
/// guard admits is sent to.
/// An attempt's future: it owns its copy of the chain's extensions and
/// borrows the chain (reqwest-middleware boxes each step too).
pub(crate) type AttemptFuture<'a> = Pin<
    Box<
        dyn Future<Output = Result<http::Response<reqwest::Body>, reqwest_middleware::Error>>
            + Send
            + 'a,
    >,
>;

#[derive(Clone)]
pub(crate) struct NextService<'a> {
    pub(crate) next: Next<'a>,
}

impl<'a> Service<http::Request<GuardBody>> for NextService<'a> {
    type Response = http::Response<reqwest::Body>;
    type Error = reqwest_middleware::Error;
    type Future = AttemptFuture<'a>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<GuardBody>) -> Self::Future {
        let (mut parts, GuardBody(body)) = req.into_parts();
        let mut chain = parts
            .extensions
            .remove::<ChainExtensions>()
            .unwrap_or_default()
            .0;
        let req = reqwest::Request::try_from(http::Request::from_parts(parts, body));
        let next = self.next.clone();
        Box::pin(async move {
            let res = next.run(req?, &mut chain).await?;
            let mut res = into_http(res);
            res.extensions_mut().insert(ChainExtensions(chain));
            Ok(res)
        })
    }
}

/// reqwest's conversion, keeping the response's URL (which reqwest's own
/// conversion drops, and the conversion back would replace with a
/// placeholder).
fn into_http(res: reqwest::Response) -> http::Response<reqwest::Body> {
    let url = res.url().clone();
    let mut out = http::Response::<reqwest::Body>::from(res);
    let mut with_url = http::Response::builder().url(url);
    if let Some(ext) = with_url.extensions_mut() {
        out.extensions_mut().extend(std::mem::take(ext));
    }
    out
}
