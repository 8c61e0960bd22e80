//! The emulated KV260 board.
//!
//! - [`datapath`]: the accelerator's arithmetic (runs the shipped U-Nets).
//! - [`memory`]: the file standing in for `/dev/mem`.
//! - [`accel`]: the HLS control block and its latency model.
//! - [`devices`]: regulators on the I2C socket, hwmon tree, console pty, power switch.
//! - [`physics`]: undervolting thresholds, upsets, power and thermal model.
//! - [`board`]: shared state and power life cycle; [`run`]: `Sim::start`.
//! - [`cli`]: the `kv260-sim` command line ([`cli::main_with_args`]).
//!
//! What is modelled and what is not: `docs/sim.md`.

pub mod datapath;

pub mod accel;
pub mod board;
pub mod cli;
pub mod devices;
pub mod memory;
pub mod physics;
pub mod run;

pub use run::{ModelInfo, Sim, SimConfig, SimError, SimHandle, SimInfo};
