//! The HIL controller: where users work.
//!
//! # Layout
//! - [`link`]: the websocket endpoint agents dial into (ws/wss, tokens, negotiation).
//! - [`registry`]: boards on three axes (connectivity, scheduling state, health).
//! - [`campaign`]: campaign files, sizing, compilation into injection lists.
//! - [`scheduling`]: health checks, chunk dispatch, reassignment, retries.
//! - [`recovery`]: consoles, crash signatures, power drivers, escalation.
//! - [`store`]: SQLite (WAL) with a group-committing writer thread.
//! - [`metrics`]: Prometheus `/metrics`.
//! - [`api`]: REST API with bearer-token roles and an OpenAPI document.
//! - [`report`]: per-stratum statistics and record exports (CSV, JSONL, Parquet).
//! - [`cli`]: `hilctl`, built on [`client`].
//! - [`demo`]: `hilctl demo`, a whole lab on one machine (roles re-executed as processes).

pub mod api;
pub mod campaign;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod link;
pub mod metrics;
pub mod recovery;
pub mod registry;
pub mod report;
pub mod scheduling;
pub mod server;
pub mod store;
#[doc(hidden)]
pub mod testutil;
