//! What one request costs, in tokens.

/// The number of tokens a request takes. Any `Fn(&Req) -> u32` is one.
pub trait RequestCost<Req> {
    /// Tokens `req` takes (a cost above the bucket's capacity is refused).
    fn cost(&self, req: &Req) -> u32;
}

/// Every request costs one token (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct UnitCost;

impl<Req> RequestCost<Req> for UnitCost {
    #[inline]
    fn cost(&self, _req: &Req) -> u32 {
        1
    }
}

impl<Req, F> RequestCost<Req> for F
where
    F: Fn(&Req) -> u32,
{
    #[inline]
    fn cost(&self, req: &Req) -> u32 {
        self(req)
    }
}
