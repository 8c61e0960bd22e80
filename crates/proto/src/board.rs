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
    /// Emulator-only parameters (physics, timing); absent on real boards. See docs/sim.md.
    #[serde(default)]
    pub sim: Option<SimSection>,
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
    /// The firmware preloads every model's parameter blob: model `id` (its index in
    /// name order among the manifests of the models directory) at
    /// `params_region.base + id * model_slot_bytes`. See [`BoardFile::model_params_addr`].
    #[serde(default = "default_model_slot_bytes")]
    pub model_slot_bytes: u64,
}

fn default_model_slot_bytes() -> u64 {
    4 << 20
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
    /// Read-only error flags (AXI decode errors, bad model id); see docs/sim.md.
    #[serde(default)]
    pub error: Option<u64>,
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

    /// Physical address of model `id`'s preloaded parameter blob, if the slot fits the
    /// parameter region.
    pub fn model_params_addr(&self, id: u32) -> Option<u64> {
        let r = self.region(&self.accelerator.params_region)?;
        let slot = self.accelerator.model_slot_bytes;
        let off = u64::from(id).checked_mul(slot)?;
        (slot > 0 && off.checked_add(slot)? <= r.size).then(|| r.base + off)
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
                    return Err(format!(
                        "regions[{i}] ({}) overlaps regions[{j}] ({})",
                        r.name, o.name
                    ));
                }
                if r.name == o.name {
                    return Err(format!("regions[{j}]: duplicate name {}", o.name));
                }
            }
        }
        let a = &self.accelerator;
        for (what, name, kind) in [
            ("accelerator.region", &a.region, Some(RegionKind::Registers)),
            (
                "accelerator.params_region",
                &a.params_region,
                Some(RegionKind::Weights),
            ),
            ("accelerator.input_region", &a.input_region, None),
            ("accelerator.output_region", &a.output_region, None),
        ] {
            match self.region(name) {
                None => return Err(format!("{what}: no region named {name:?}")),
                Some(r) if kind.is_some_and(|k| k != r.kind) => {
                    return Err(format!(
                        "{what}: region {name:?} is {:?}, expected {:?}",
                        r.kind,
                        kind.unwrap()
                    ));
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
                return Err(format!(
                    "rails[{i}] ({}): DA913x range is 300..=1900 mV",
                    r.name
                ));
            }
        }
        Ok(())
    }
}

/// Resolve a path from the board file against the run-time root.
pub fn resolve(root: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        root.join(p)
    }
}

/// Emulator-only parameters. Every field has a default, so a board file may give only
/// the ones it changes. Voltages in mV, temperatures in degC, powers in W.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimSection {
    /// Models directory, relative to the board file's own directory.
    pub models_dir: PathBuf,
    /// Name of the rail whose voltage drives the timing-fault model.
    pub fault_rail: String,
    /// Time from power-on to the login prompt (boot log replayed meanwhile).
    pub boot_ms: u64,
    /// Shortest power-off that fully discharges the SOM (UG1091: 2 s); shorter offs lock
    /// the sequencer until a long off.
    pub min_off_ms: u64,
    /// First timing faults below this VCCINT (guardband edge).
    pub vmin_mv: f64,
    /// The accelerator hangs (ap_done never set) below this.
    pub vhang_mv: f64,
    /// The whole board crashes (kernel panic) below this.
    pub vcrash_mv: f64,
    /// Per-board variation of the three thresholds: uniform in +-spread, from the seed.
    pub spread_mv: f64,
    /// Upset probability per MAC at Vmin and the reference temperature.
    pub fault_per_mac_at_vmin: f64,
    /// The upset rate grows by e for every this many mV below Vmin ...
    pub fault_mv_per_efold: f64,
    /// ... and for every this many degC above `fault_ref_c`.
    pub fault_c_per_efold: f64,
    pub fault_ref_c: f64,
    pub ambient_c: f64,
    /// Regulator output slew (DA9121 driver default ramp_delay: 20 mV/us).
    pub slew_mv_per_us: f64,
    /// Cycle model: int8 MACs per cycle at full channel use (B4096: 2048).
    pub int8_macs_per_cycle: u64,
    /// Input/output channel parallelism of the int8 engine (B4096: ICP 16, OCP 16).
    pub int8_icp: u64,
    pub int8_ocp: u64,
    pub fp32_macs_per_cycle: u64,
    pub layer_overhead_cycles: u64,
    /// DDR bandwidth seen by the engine, bytes per accelerator cycle.
    pub axi_bytes_per_cycle: u64,
    /// Mean interval of kernel printk noise on the console (0: none).
    pub printk_interval_s: f64,
    /// Register polling: sleep when idle, sleep when recently active, how long "recently" lasts.
    pub idle_poll_us: u64,
    pub hot_poll_us: u64,
    pub hot_window_ms: u64,
    /// SOM input power besides the PL (PS, DDR, carrier), at 25 degC.
    pub base_w: f64,
    /// PL leakage at nominal VCCINT and 25 degC; doubles every `leak_c_per_double` degC.
    pub pl_leak_w: f64,
    pub leak_c_per_double: f64,
    /// PL dynamic power at nominal VCCINT when the accelerator is busy / idle (clock tree).
    pub pl_dyn_busy_w: f64,
    pub pl_dyn_idle_w: f64,
    /// Thermal RC: degC per W above ambient, time constant.
    pub thermal_c_per_w: f64,
    pub thermal_tau_s: f64,
    /// INA260 sample period (default config 0x6327: 8.8 ms).
    pub ina260_period_us: u64,
    /// AMS refresh period of the hwmon files.
    pub ams_period_ms: u64,
}

impl Default for SimSection {
    fn default() -> Self {
        SimSection {
            models_dir: PathBuf::from("../models"),
            fault_rail: "vccint".into(),
            boot_ms: 3000,
            min_off_ms: 2000,
            vmin_mv: 570.0,
            vhang_mv: 540.0,
            vcrash_mv: 530.0,
            spread_mv: 10.0,
            fault_per_mac_at_vmin: 3e-9,
            fault_mv_per_efold: 5.0,
            fault_c_per_efold: 20.0,
            fault_ref_c: 50.0,
            ambient_c: 25.0,
            slew_mv_per_us: 20.0,
            int8_macs_per_cycle: 2048,
            int8_icp: 16,
            int8_ocp: 16,
            fp32_macs_per_cycle: 64,
            layer_overhead_cycles: 2000,
            axi_bytes_per_cycle: 16,
            printk_interval_s: 45.0,
            idle_poll_us: 2000,
            hot_poll_us: 50,
            hot_window_ms: 250,
            base_w: 3.2,
            pl_leak_w: 0.35,
            leak_c_per_double: 25.0,
            pl_dyn_busy_w: 2.4,
            pl_dyn_idle_w: 0.15,
            thermal_c_per_w: 6.0,
            thermal_tau_s: 30.0,
            ina260_period_us: 8800,
            ams_period_ms: 50,
        }
    }
}
