//! The emulated KV260 board.
//!
//! - [`datapath`]: the accelerator's arithmetic (runs the shipped U-Nets).

pub mod datapath;
