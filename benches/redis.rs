//! Placeholder until the redis benches land.
fn main() {}
