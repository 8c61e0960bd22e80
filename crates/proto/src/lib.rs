//! Everything that crosses a process boundary.
//!
//! - [`wire`]: proto v1, the messages between `hil-agent` and `hil-controller`.
//! - [`board`]: the board description file (YAML), read by the emulator and the agent.
//! - [`manifest`]: the model manifest (JSON) written by the Python tooling, read by the
//!   datapath and the agent.
//! - [`model_files`]: loading model files and test sets, input quantisation, class maps.
//! - [`yaml`]: the one place YAML is parsed, so every file gets the same located errors.

pub mod board;
pub mod manifest;
pub mod model_files;
pub mod smbus;
pub mod wire;
pub mod yaml;
