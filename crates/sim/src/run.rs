//! Building and running one emulated board: `Sim::start(config) -> SimHandle`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use proto::board::{BoardFile, I2cBus, resolve};
use serde::Serialize;

use crate::board::{Activity, Life, LifeState, Shared, Slot};
use crate::datapath::Model;
use crate::devices::console::Console;
use crate::devices::hwmon::Hwmon;
use crate::devices::regulator::{Bus, buses_of};
use crate::memory::MemFile;
use crate::physics::Thresholds;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub board_file: PathBuf,
    pub state_dir: PathBuf,
    pub seed: u64,
    /// Overrides the board file's `sim.models_dir`.
    pub models_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Board(#[from] proto::board::BoardError),
    #[error("{0}")]
    Config(String),
    #[error("state dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Mem(#[from] crate::memory::MemError),
    #[error(transparent)]
    Console(#[from] crate::devices::console::ConsoleError),
    #[error("models dir {path}: {source}")]
    Models {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub id: u32,
    pub name: String,
    pub params_addr: u64,
    pub params_bytes: usize,
    pub input_bytes: usize,
    pub output_bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where everything is: printed as one JSON line by `kv260-sim`.
#[derive(Debug, Clone, Serialize)]
pub struct SimInfo {
    pub board: String,
    pub board_file: PathBuf,
    pub state_dir: PathBuf,
    pub seed: u64,
    pub mem: PathBuf,
    pub file_base: u64,
    pub hwmon: PathBuf,
    pub i2c: Vec<PathBuf>,
    pub console: PathBuf,
    pub console_pty: PathBuf,
    pub power: PathBuf,
    pub models_dir: PathBuf,
    pub models: Vec<ModelInfo>,
    /// This board's undervolting thresholds (what a lab would characterise).
    pub physics: Thresholds,
}

pub struct Sim;

pub struct SimHandle {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    info: SimInfo,
}

impl Sim {
    pub fn start(cfg: SimConfig) -> Result<SimHandle, SimError> {
        let board = BoardFile::load(&cfg.board_file)?;
        let p = board.sim.clone().unwrap_or_default();
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| SimError::StateDir {
            path: cfg.state_dir.clone(),
            source,
        })?;
        let state_dir = cfg
            .state_dir
            .canonicalize()
            .map_err(|source| SimError::StateDir {
                path: cfg.state_dir.clone(),
                source,
            })?;
        let board_dir = cfg
            .board_file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let models_dir = cfg
            .models_dir
            .clone()
            .unwrap_or_else(|| resolve(&board_dir, &p.models_dir));
        let models_dir = models_dir
            .canonicalize()
            .map_err(|source| SimError::Models {
                path: models_dir.clone(),
                source,
            })?;

        // Memory file covering every region.
        let file_base = board.memory.file_base;
        let end = board
            .regions
            .iter()
            .map(|r| r.base + r.size)
            .max()
            .unwrap_or(file_base);
        if end <= file_base {
            return Err(SimError::Config("board file has no memory regions".into()));
        }
        let mem_path = resolve(&state_dir, &board.memory.device);
        if mem_path.starts_with("/dev") {
            return Err(SimError::Config(format!(
                "memory.device is {}: the emulator needs a file (use kv260-sim.yaml, not the real board's file)",
                mem_path.display()
            )));
        }
        let mem = MemFile::create(&mem_path, file_base, end - file_base)?;

        // Models: every manifest in the directory, in name order; id = index.
        let slots = load_slots(&board, &models_dir)?;

        // Buses and rails.
        let raw_buses = buses_of(&board, p.slew_mv_per_us).map_err(SimError::Config)?;
        let mut buses = BTreeMap::new();
        for (path, bus) in raw_buses {
            buses.insert(resolve(&state_dir, &path), Mutex::new(bus));
        }
        for r in &board.rails {
            if let I2cBus::Dev(d) = &r.bus {
                return Err(SimError::Config(format!(
                    "rail {}: bus is the device {}; the emulator serves only `socket:` buses",
                    r.name,
                    d.display()
                )));
            }
        }
        let fault = board.rail(&p.fault_rail);
        let fault_rail = fault.map(|r| {
            let (I2cBus::Socket(s) | I2cBus::Dev(s)) = &r.bus;
            (resolve(&state_dir, s), Bus::rail_ref(r))
        });
        let fault_rail_nominal_mv = fault.map_or(850.0, |r| f64::from(r.nominal_mv));
        if fault.is_none() {
            tracing::warn!(rail = %p.fault_rail, "no such rail: the fault model sees a constant nominal voltage");
        }

        let console_link = resolve(
            &state_dir,
            board
                .console
                .as_ref()
                .map_or(Path::new("console"), |c| c.device.as_path()),
        );
        let console = Console::open(&console_link)?;
        let hwmon_root = resolve(&state_dir, &board.sensors.hwmon_root);
        let hwmon = Hwmon::create(&hwmon_root, &board.sensors.power, &board.sensors.ams).map_err(
            |source| SimError::StateDir {
                path: hwmon_root.clone(),
                source,
            },
        )?;
        let power_path = state_dir.join("power.sock");

        let thresholds = Thresholds::for_board(&p, cfg.seed);
        let info = SimInfo {
            board: board.board.clone(),
            board_file: cfg.board_file.clone(),
            state_dir: state_dir.clone(),
            seed: cfg.seed,
            mem: mem_path,
            file_base,
            hwmon: hwmon_root,
            i2c: buses.keys().cloned().collect(),
            console: console_link,
            console_pty: console.slave_path().to_path_buf(),
            power: power_path.clone(),
            models_dir: models_dir.clone(),
            models: slots
                .iter()
                .map(|s| ModelInfo {
                    id: s.id,
                    name: s.name.clone(),
                    params_addr: s.addr,
                    params_bytes: s.model.as_ref().map_or(0, |m| m.manifest().params_bytes),
                    input_bytes: s.model.as_ref().map_or(0, |m| m.input_bytes()),
                    output_bytes: s.model.as_ref().map_or(0, |m| m.output_bytes()),
                    error: s.error.clone(),
                })
                .collect(),
            physics: thresholds,
        };
        let _ = std::fs::write(
            state_dir.join("models.json"),
            serde_json::to_string_pretty(&info.models).unwrap_or_default(),
        );
        let ambient = p.ambient_c;
        let shared = Arc::new(Shared {
            board,
            p,
            seed: cfg.seed,
            state_dir,
            thresholds,
            mem,
            slots,
            life: Mutex::new(LifeState {
                outlet_on: false,
                life: Life::Off,
                off_since: None,
                boot_until: None,
                kernel_t0: Instant::now(),
            }),
            life_cv: Condvar::new(),
            epoch: AtomicU64::new(0),
            buses,
            fault_rail,
            fault_rail_nominal_mv,
            activity: Mutex::new(Activity::default()),
            ambient_c: Mutex::new(ambient),
            sensors: Mutex::new(Default::default()),
            console,
            stop: AtomicBool::new(false),
            inferences: AtomicU64::new(0),
            i2c_listeners: Mutex::new(BTreeMap::new()),
        });

        let mut threads = Vec::new();
        // Every board thread logs inside the board's span (several boards per process).
        let span = tracing::info_span!("board", board = %shared.board.board, seed = shared.seed);
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            let span = span.clone();
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || span.in_scope(f))
                .expect("spawning a board thread")
        };
        let s = shared.clone();
        threads.push(spawn("supervisor", Box::new(move || s.supervise())));
        let s = shared.clone();
        threads.push(spawn("accel", Box::new(move || crate::accel::run(s))));
        let s = shared.clone();
        threads.push(spawn(
            "hwmon",
            Box::new(move || crate::devices::hwmon::run(s, hwmon)),
        ));
        let s = shared.clone();
        threads.push(spawn(
            "console-out",
            Box::new(move || s.console.write_loop(&|| s.stopping())),
        ));
        let s = shared.clone();
        threads.push(spawn(
            "console-in",
            Box::new(move || s.console.read_loop(&|| s.stopping(), &|| s.is_up())),
        ));
        for path in shared.buses.keys().cloned() {
            let s = shared.clone();
            threads.push(spawn(
                "i2c",
                Box::new(move || crate::devices::i2c::run(s, path)),
            ));
        }
        let s = shared.clone();
        threads.push(spawn(
            "power",
            Box::new(move || crate::devices::power::run(s, power_path)),
        ));

        shared.power_on();
        Ok(SimHandle {
            shared,
            threads,
            info,
        })
    }
}

fn load_slots(board: &BoardFile, dir: &Path) -> Result<Vec<Slot>, SimError> {
    let rd = std::fs::read_dir(dir).map_err(|source| SimError::Models {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .map(str::to_string)
        })
        .collect();
    names.sort();
    let slot_bytes = board.accelerator.model_slot_bytes as usize;
    let mut slots = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        let id = i as u32;
        let Some(addr) = board.model_params_addr(id) else {
            tracing::warn!(model = %name, id, "no parameter slot left for this model; skipped");
            continue;
        };
        let (model, error) = match Model::load(dir, &name) {
            Ok(m) if m.manifest().params_bytes > slot_bytes => (
                None,
                Some(format!(
                    "params_bytes {} exceed the slot of {slot_bytes} bytes",
                    m.manifest().params_bytes
                )),
            ),
            Ok(m) => (Some(Arc::new(m)), None),
            Err(e) => (None, Some(e.to_string())),
        };
        if let Some(e) = &error {
            tracing::warn!(model = %name, error = %e, "model not loaded; its id answers with ERR_BAD_MODEL");
        }
        slots.push(Slot {
            id,
            name,
            addr,
            model,
            error,
        });
    }
    Ok(slots)
}

impl SimHandle {
    pub fn info(&self) -> &SimInfo {
        &self.info
    }

    /// In-process control of the power switch (same as the power socket).
    pub fn power_command(&self, line: &str) -> String {
        crate::devices::power::command(&self.shared, line)
    }

    pub fn life(&self) -> Life {
        self.shared.life().0
    }

    /// Stop every board thread and wait for them.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.life_cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.info.power);
        for p in &self.info.i2c {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shutdown();
        }
    }
}
