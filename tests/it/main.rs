//! Integration tests: one binary, real servers, the real binary.

mod helpers;

mod canonical;
mod cli;
mod stabilize_store;
mod store;
