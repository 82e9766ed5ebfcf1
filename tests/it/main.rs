//! Integration tests: one binary, real servers, the real binary.

mod helpers;

mod backfill;
mod canonical;
mod cli;
mod cluster;
mod compact_state;
mod crosscheck;
mod daemon;
mod feed;
mod float_repr;
mod fuzz_socket;
mod payload;
mod producers;
mod stabilize_store;
mod store;
mod systemd;
