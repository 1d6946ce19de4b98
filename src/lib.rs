//! Support code shared by the workspace's examples and end-to-end tests:
//! small local servers that misbehave on command, and a real nginx with a
//! rate limit.

#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod demo;
pub mod nginx;
pub mod plot;
pub mod upstream;

pub use upstream::{Behavior, Upstream};

/// The top-level README, whose Rust snippets `cargo test` compiles and runs
/// as doc-tests (the server ones are compiled only), so that what a
/// newcomer pastes keeps working.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct Readme;
