//! The board description file (YAML): what the hardware looks like to software.
//! One file per board type; `board-images/boards/kv260.yaml` describes the real KV260,
//! `kv260-sim.yaml` the emulated one. The emulator builds itself from it and the agent
//! drives hardware through it, so the two cannot drift apart.
//!
//! Relative paths in the file (memory device, hwmon root, I2C socket, console) are
//! resolved against a root directory given at run time (the emulator's state dir);
//! absolute paths (`/dev/mem`) are used as they are.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::yaml::YamlError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardFile {
    /// Board type, e.g. `kv260` or `kv260-sim`.
    pub board: String,
    pub memory: Memory,
    pub regions: Vec<Region>,
    pub accelerator: Accelerator,
    pub rails: Vec<Rail>,
    pub sensors: Sensors,
    #[serde(default)]
    pub console: Option<Console>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    /// `/dev/mem` on hardware; a file (relative to the root) on the emulator.
    pub device: PathBuf,
    /// Physical address at file offset 0 (0 for /dev/mem).
    #[serde(default)]
    pub file_base: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegionKind {
    Registers,
    Weights,
    Activations,
    Io,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub name: String,
    pub base: u64,
    pub size: u64,
    pub kind: RegionKind,
    /// Only injectable regions may be poked by a fault, whatever the controller asks.
    pub injectable: bool,
}

impl Region {
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.base && addr.saturating_add(len) <= self.base.saturating_add(self.size)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelDriver {
    Hls,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accelerator {
    pub driver: AccelDriver,
    /// Name of the `registers` region holding the AXI-Lite control block.
    pub region: String,
    /// Expected value of the read-only ID register; the agent refuses to start otherwise.
    pub id: u32,
    pub clock_hz: u64,
    pub regs: AccelRegs,
    /// Regions the agent uses for the model's parameters, the input and the output.
    pub params_region: String,
    pub input_region: String,
    pub output_region: String,
}

/// Byte offsets inside the control block. AP_CTRL/GIE/IER/ISR are fixed by HLS at
/// 0x00/0x04/0x08/0x0C; the argument offsets come from the generated `x<name>_hw.h`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccelRegs {
    pub input_addr: u64,
    pub output_addr: u64,
    pub params_addr: u64,
    pub model_id: u64,
    pub id: u64,
    pub version: u64,
    pub cycles: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RailDriver {
    Da913x,
    Pmbus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rail {
    pub name: String,
    pub driver: RailDriver,
    pub bus: I2cBus,
    pub address: u8,
    /// DA913x: VOUT register (0x25 for buck 1, 0x2D for buck 2). PMBus: the PAGE.
    pub register: u8,
    pub nominal_mv: u32,
    /// Hard limits: the agent refuses anything outside, never clamps silently.
    pub min_mv: u32,
    pub max_mv: u32,
    /// Largest single step; bigger changes are walked in steps.
    pub step_mv: u32,
    /// Wait after each step before reading back.
    pub settle_ms: u32,
    /// AMS hwmon channel that reads this rail back, if any (e.g. `in3_input`).
    #[serde(default)]
    pub ams_channel: Option<String>,
}

/// How the agent reaches an I2C bus. On a board: `/dev/i2c-N` with i2c-dev ioctls. On
/// the emulator: a Unix socket carrying the same SMBus transactions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum I2cBus {
    Dev(PathBuf),
    Socket(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sensors {
    /// `/sys/class/hwmon` on hardware; a directory on the emulator.
    pub hwmon_root: PathBuf,
    /// hwmon `name` of the board power monitor (INA260: `ina260_u14`).
    pub power: String,
    /// hwmon `name` of the on-die monitor (`ams`).
    pub ams: String,
    /// AMS temperature channels, e.g. `temp1_input` (LPD), `temp2_input` (FPD), `temp3_input` (PL).
    pub temperatures: Vec<String>,
    /// Temperature above which the agent stops a job (m°C in sysfs, °C here).
    pub max_temp_c: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Console {
    pub device: PathBuf,
    pub baud: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error(transparent)]
    Yaml(#[from] YamlError),
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

impl BoardFile {
    pub fn load(path: &Path) -> Result<BoardFile, BoardError> {
        let b: BoardFile = crate::yaml::from_path(path)?;
        b.validate().map_err(|message| BoardError::Invalid {
            origin: path.display().to_string(),
            message,
        })?;
        Ok(b)
    }

    pub fn from_str(origin: &str, text: &str) -> Result<BoardFile, BoardError> {
        let b: BoardFile = crate::yaml::from_str(origin, text)?;
        b.validate().map_err(|message| BoardError::Invalid {
            origin: origin.to_string(),
            message,
        })?;
        Ok(b)
    }

    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.name == name)
    }

    pub fn rail(&self, name: &str) -> Option<&Rail> {
        self.rails.iter().find(|r| r.name == name)
    }

    /// Region holding `[addr, addr+len)`, if exactly one does.
    pub fn region_at(&self, addr: u64, len: u64) -> Option<&Region> {
        self.regions.iter().find(|r| r.contains(addr, len))
    }

    pub fn validate(&self) -> Result<(), String> {
        let page = 4096u64;
        for (i, r) in self.regions.iter().enumerate() {
            if r.size == 0 || r.base % page != 0 || r.size % page != 0 {
                return Err(format!(
                    "regions[{i}] ({}): base {:#x} and size {:#x} must be non-zero multiples of the 4 KiB page",
                    r.name, r.base, r.size
                ));
            }
            if r.base < self.memory.file_base {
                return Err(format!(
                    "regions[{i}] ({}): base {:#x} is below memory.file_base {:#x}",
                    r.name, r.base, self.memory.file_base
                ));
            }
            for (j, o) in self.regions.iter().enumerate().skip(i + 1) {
                if r.base < o.base + o.size && o.base < r.base + r.size {
                    return Err(format!("regions[{i}] ({}) overlaps regions[{j}] ({})", r.name, o.name));
                }
                if r.name == o.name {
                    return Err(format!("regions[{j}]: duplicate name {}", o.name));
                }
            }
        }
        let a = &self.accelerator;
        for (what, name, kind) in [
            ("accelerator.region", &a.region, Some(RegionKind::Registers)),
            ("accelerator.params_region", &a.params_region, Some(RegionKind::Weights)),
            ("accelerator.input_region", &a.input_region, None),
            ("accelerator.output_region", &a.output_region, None),
        ] {
            match self.region(name) {
                None => return Err(format!("{what}: no region named {name:?}")),
                Some(r) if kind.is_some_and(|k| k != r.kind) => {
                    return Err(format!("{what}: region {name:?} is {:?}, expected {:?}", r.kind, kind.unwrap()));
                }
                _ => {}
            }
        }
        for (i, r) in self.rails.iter().enumerate() {
            if !(r.min_mv <= r.nominal_mv && r.nominal_mv <= r.max_mv) {
                return Err(format!(
                    "rails[{i}] ({}): need min_mv <= nominal_mv <= max_mv, got {} <= {} <= {}",
                    r.name, r.min_mv, r.nominal_mv, r.max_mv
                ));
            }
            if r.step_mv == 0 {
                return Err(format!("rails[{i}] ({}): step_mv must be > 0", r.name));
            }
            if r.driver == RailDriver::Da913x && !(300..=1900).contains(&r.min_mv) {
                return Err(format!("rails[{i}] ({}): DA913x range is 300..=1900 mV", r.name));
            }
        }
        Ok(())
    }
}

/// Resolve a path from the board file against the run-time root.
pub fn resolve(root: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { root.join(p) }
}
