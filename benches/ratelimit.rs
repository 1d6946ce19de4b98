//! Placeholder until the ratelimit benches land.
fn main() {}
