//! Helpers shared by the criterion benches of this package.
