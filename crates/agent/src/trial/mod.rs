//! Golden runs, the per-trial sequence and its classification, field mode.

pub mod classify;
pub mod engine;
pub mod worker;
