//! hil-agent: the board daemon. It is the only program that touches the hardware.
//!
//! # Layout
//! - [`hw`]: /dev/mem windows, I2C (i2c-dev or the emulator socket), regulators, hwmon.
//! - [`board`]: the board assembled from its board file (regions, rails, sensors).
//! - [`driver`]: the HLS accelerator control protocol.
//! - [`inject`]: fault specs -> checked pokes, restore and pristine verification.
//! - [`trial`]: golden runs, the per-trial loop, classification, field mode.
//! - [`safety`]: voltage interlocks and restoring nominal on every exit path.
//! - [`link`]: the durable record spool and the websocket client (proto v1).
//! - [`config`]: the agent's YAML config.
//! - [`cli`]: the `hil-agent` command line ([`cli::main_with_args`]).

pub mod board;
pub mod cli;
pub mod config;
pub mod driver;
pub mod hw;
pub mod inject;
pub mod link;
pub mod safety;
pub mod trial;

use proto::board::BoardFile;
use proto::wire::{Capabilities, ModelInfo, RailInfo, RegionInfo};

/// What this agent can do, for `Hello`.
pub fn capabilities(file: &BoardFile, models_dir: &std::path::Path) -> Capabilities {
    let models = trial::engine::list_models(models_dir)
        .into_iter()
        .filter_map(|name| {
            let m =
                proto::manifest::Manifest::load(&models_dir.join(format!("{name}.json"))).ok()?;
            let inputs = testset_len(&models_dir.join(format!("testset-{}.safetensors", m.size)))
                .unwrap_or(0);
            Some(ModelInfo {
                name,
                activation: m.activation.clone(),
                stage: m.stage.clone(),
                params_bytes: m.params_bytes as u64,
                inputs,
            })
        })
        .collect();
    let mut sensors = vec![file.sensors.power.clone(), file.sensors.ams.clone()];
    sensors.extend(file.sensors.temperatures.iter().cloned());
    Capabilities {
        board_type: file.board.clone(),
        models,
        regions: file
            .regions
            .iter()
            .map(|r| RegionInfo {
                name: r.name.clone(),
                kind: format!("{:?}", r.kind).to_lowercase(),
                size: r.size,
                injectable: r.injectable,
            })
            .collect(),
        rails: file
            .rails
            .iter()
            .map(|r| RailInfo {
                name: r.name.clone(),
                nominal_mv: r.nominal_mv,
                min_mv: r.min_mv,
                max_mv: r.max_mv,
                step_mv: r.step_mv,
            })
            .collect(),
        sensors,
    }
}

/// Number of images in a test set, from the safetensors header only (the file itself
/// can be tens of MB; the agent's memory budget is not).
pub fn testset_len(path: &std::path::Path) -> Option<u32> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n).ok()?;
    let len = u64::from_le_bytes(n);
    if len > 1 << 20 {
        return None;
    }
    let mut h = vec![0u8; len as usize];
    f.read_exact(&mut h).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&h).ok()?;
    v.get("inputs")?
        .get("shape")?
        .get(0)?
        .as_u64()
        .map(|n| n as u32)
}
