//! The board assembled from its board file: mapped regions, rails with their drivers,
//! sensors. Nothing here decides policy; `safety` and `trial` do.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::board::{BoardFile, Rail, RailDriver, Region};

use crate::hw::devmem::{MmioError, MmioWindow};
use crate::hw::hwmon::{Hwmon, HwmonError};
use crate::hw::i2c::{self, I2cError};
use crate::hw::regulator::{Da913x, Pmbus, Regulator, SharedBus};

#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error(transparent)]
    File(#[from] proto::board::BoardError),
    #[error("region {region}: {source}")]
    Map {
        region: String,
        #[source]
        source: MmioError,
    },
    #[error(transparent)]
    I2c(#[from] I2cError),
    #[error(transparent)]
    Hwmon(#[from] HwmonError),
}

pub struct RailHandle {
    pub cfg: Rail,
    pub reg: Box<dyn Regulator>,
}

/// Build each rail's driver; rails on the same bus share one handle.
pub fn open_rails(file: &BoardFile, root: &Path) -> Result<Vec<RailHandle>, I2cError> {
    let mut buses: HashMap<PathBuf, SharedBus> = HashMap::new();
    let mut rails = Vec::new();
    for r in &file.rails {
        let key = i2c::bus_key(&r.bus, root);
        let bus = match buses.get(&key) {
            Some(b) => b.clone(),
            None => {
                let b: SharedBus = Arc::new(Mutex::new(i2c::open_bus(&r.bus, root)?));
                buses.insert(key, b.clone());
                b
            }
        };
        let reg: Box<dyn Regulator> = match r.driver {
            RailDriver::Da913x => Box::new(Da913x::new(&r.name, bus, r.address, r.register)),
            RailDriver::Pmbus => Box::new(Pmbus::new(&r.name, bus, r.address, r.register)),
        };
        rails.push(RailHandle {
            cfg: r.clone(),
            reg,
        });
    }
    Ok(rails)
}

/// A sysfs attribute kept open and re-read with pread (cheaper than open/read/close).
struct Attr {
    file: Option<File>,
    path: PathBuf,
}

impl Attr {
    fn new(dir: &Path, name: &str) -> Attr {
        let path = dir.join(name);
        Attr {
            file: File::open(&path).ok(),
            path,
        }
    }
    fn read(&mut self) -> Option<i64> {
        if self.file.is_none() {
            self.file = File::open(&self.path).ok();
        }
        let f = self.file.as_ref()?;
        let mut buf = [0u8; 32];
        match f.read_at(&mut buf, 0) {
            Ok(n) => std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok(),
            Err(_) => {
                self.file = None;
                None
            }
        }
    }
}

/// Cached sensor readings. The INA260 only converts every 8.8 ms and AMS at a few Hz,
/// so reading faster returns the same sample; the cache keeps per-inference readings
/// cheap without losing information.
pub struct Sensors {
    power: Option<Attr>,
    current: Option<Attr>,
    rails: Vec<(String, Attr)>,
    temps: Vec<(String, Attr)>,
    last_power: Option<(Instant, f32, f32)>,
    last_slow: Option<(Instant, Vec<f32>, Vec<f32>)>,
    pub power_period: Duration,
    pub slow_period: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct Reading {
    pub power_w: f32,
    pub current_a: f32,
    pub rails_mv: Vec<(String, f32)>,
    pub temps_c: Vec<(String, f32)>,
}

impl Sensors {
    pub fn open(file: &BoardFile, root: &Path) -> Result<Sensors, HwmonError> {
        let hroot = proto::board::resolve(root, &file.sensors.hwmon_root);
        let power = Hwmon::find(&hroot, &file.sensors.power)?;
        let ams = Hwmon::find(&hroot, &file.sensors.ams)?;
        Ok(Sensors {
            power: Some(Attr::new(&power.dir, "power1_input")),
            current: Some(Attr::new(&power.dir, "curr1_input")),
            rails: file
                .rails
                .iter()
                .filter_map(|r| {
                    r.ams_channel
                        .as_ref()
                        .map(|c| (r.name.clone(), Attr::new(&ams.dir, c)))
                })
                .collect(),
            temps: file
                .sensors
                .temperatures
                .iter()
                .map(|t| (t.clone(), Attr::new(&ams.dir, t)))
                .collect(),
            last_power: None,
            last_slow: None,
            power_period: Duration::from_millis(9),
            slow_period: Duration::from_millis(100),
        })
    }

    /// Board power (W) and current (A), at most one sysfs read per `power_period`.
    pub fn power(&mut self) -> (f32, f32) {
        if let Some((t, p, c)) = self.last_power
            && t.elapsed() < self.power_period
        {
            return (p, c);
        }
        let p = self.power.as_mut().and_then(|a| a.read()).unwrap_or(0) as f32 / 1e6;
        let c = self.current.as_mut().and_then(|a| a.read()).unwrap_or(0) as f32 / 1e3;
        self.last_power = Some((Instant::now(), p, c));
        (p, c)
    }

    fn slow(&mut self, fresh: bool) -> (&[f32], &[f32]) {
        let stale = match &self.last_slow {
            Some((t, _, _)) => fresh || t.elapsed() >= self.slow_period,
            None => true,
        };
        if stale {
            let r = self
                .rails
                .iter_mut()
                .map(|(_, a)| a.read().map(|v| v as f32).unwrap_or(f32::NAN))
                .collect();
            let t = self
                .temps
                .iter_mut()
                .map(|(_, a)| a.read().map(|v| v as f32 / 1e3).unwrap_or(f32::NAN))
                .collect();
            self.last_slow = Some((Instant::now(), r, t));
        }
        let (_, r, t) = self.last_slow.as_ref().expect("filled above");
        (r, t)
    }

    /// AMS read-back of a rail (mV), if the rail has a channel. `fresh` bypasses the cache.
    pub fn rail_mv(&mut self, rail: &str, fresh: bool) -> Option<f32> {
        let i = self.rails.iter().position(|(n, _)| n == rail)?;
        let v = self.slow(fresh).0[i];
        (!v.is_nan()).then_some(v)
    }

    /// Hottest AMS temperature (°C).
    pub fn max_temp_c(&mut self) -> f32 {
        self.slow(false)
            .1
            .iter()
            .copied()
            .filter(|v| !v.is_nan())
            .fold(f32::NAN, f32::max)
    }

    pub fn reading(&mut self) -> Reading {
        let (power_w, current_a) = self.power();
        let names: Vec<String> = self.rails.iter().map(|(n, _)| n.clone()).collect();
        let tnames: Vec<String> = self.temps.iter().map(|(n, _)| n.clone()).collect();
        let (r, t) = self.slow(false);
        Reading {
            power_w,
            current_a,
            rails_mv: names.into_iter().zip(r.iter().copied()).collect(),
            temps_c: tnames.into_iter().zip(t.iter().copied()).collect(),
        }
    }
}

/// Map one region.
pub fn map_region(file: &BoardFile, root: &Path, r: &Region) -> Result<MmioWindow, BoardError> {
    let dev = proto::board::resolve(root, &file.memory.device);
    MmioWindow::open(&dev, file.memory.file_base, r.base, r.size).map_err(|source| {
        BoardError::Map {
            region: r.name.clone(),
            source,
        }
    })
}

pub struct Board {
    pub file: BoardFile,
    pub root: PathBuf,
    /// Every region, mapped (mappings cost address space, not memory, until touched).
    pub windows: HashMap<String, Arc<MmioWindow>>,
    pub rails: Vec<RailHandle>,
    pub sensors: Sensors,
}

impl Board {
    pub fn open(board_file: &Path, root: &Path) -> Result<Board, BoardError> {
        let file = BoardFile::load(board_file)?;
        let mut windows = HashMap::new();
        for r in &file.regions {
            windows.insert(r.name.clone(), Arc::new(map_region(&file, root, r)?));
        }
        let rails = open_rails(&file, root)?;
        let sensors = Sensors::open(&file, root)?;
        Ok(Board {
            file,
            root: root.to_path_buf(),
            windows,
            rails,
            sensors,
        })
    }

    pub fn window(&self, region: &str) -> Option<&Arc<MmioWindow>> {
        self.windows.get(region)
    }

    pub fn rail_mut(&mut self, name: &str) -> Option<&mut RailHandle> {
        self.rails.iter_mut().find(|r| r.cfg.name == name)
    }
}
