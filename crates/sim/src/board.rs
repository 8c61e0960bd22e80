//! One emulated board: the state every device thread shares, and its power life cycle
//! (off, booting, up, crashed, sequencer lock-up).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use proto::board::{BoardFile, SimSection};
use serde::Serialize;

use crate::datapath::Model;
use crate::devices::console::Console;
use crate::devices::regulator::{Bus, RailRef, SensorView};
use crate::memory::MemFile;
use crate::physics::Thresholds;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Life {
    Off,
    Booting,
    Up,
    Crashed,
    /// The SOM sequencer locked after a too-short power-off: nothing answers until a
    /// long power-off.
    Locked,
}

#[derive(Debug)]
pub struct LifeState {
    pub outlet_on: bool,
    pub life: Life,
    pub off_since: Option<Instant>,
    pub boot_until: Option<Instant>,
    /// When the kernel's clock started (for printk timestamps).
    pub kernel_t0: Instant,
}

/// A model slot of the accelerator's firmware.
pub struct Slot {
    pub id: u32,
    pub name: String,
    pub addr: u64,
    pub model: Option<Arc<Model>>,
    pub error: Option<String>,
}

#[derive(Debug, Default)]
pub struct Activity {
    pub busy_since: Option<Instant>,
    pub busy_total: Duration,
}

impl Activity {
    pub fn total(&self, now: Instant) -> Duration {
        self.busy_total
            + self
                .busy_since
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s))
    }
}

pub struct Shared {
    pub board: BoardFile,
    pub p: SimSection,
    pub seed: u64,
    pub state_dir: PathBuf,
    pub thresholds: Thresholds,
    pub mem: MemFile,
    pub slots: Vec<Slot>,
    pub life: Mutex<LifeState>,
    pub life_cv: Condvar,
    /// Bumped on every power transition and crash; threads drop work of older epochs.
    pub epoch: AtomicU64,
    /// Buses by resolved socket path.
    pub buses: BTreeMap<PathBuf, Mutex<Bus>>,
    /// The fault rail: which bus and device.
    pub fault_rail: Option<(PathBuf, RailRef)>,
    pub fault_rail_nominal_mv: f64,
    pub activity: Mutex<Activity>,
    pub ambient_c: Mutex<f64>,
    pub sensors: Mutex<SensorView>,
    pub console: Console,
    pub stop: AtomicBool,
    pub inferences: AtomicU64,
    /// I2C listeners bound by `finish_boot` (so the bus answers by the time the login
    /// prompt shows), taken by the bus threads; dropped on any power event.
    pub i2c_listeners: Mutex<BTreeMap<PathBuf, (u64, std::os::unix::net::UnixListener)>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking device thread must not take the whole board down with poisoned locks.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn life(&self) -> (Life, u64) {
        let l = lock(&self.life);
        (l.life, self.epoch.load(Ordering::Acquire))
    }

    pub fn is_up(&self) -> bool {
        self.life().0 == Life::Up
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// New epoch; `up` says whether the board is up in it (callers may hold the life lock).
    fn bump(&self, up: bool) -> u64 {
        let e = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        if !up {
            // A dead board's bus does not answer, even if no thread took the listener yet.
            lock(&self.i2c_listeners).clear();
        }
        self.life_cv.notify_all();
        e
    }

    /// Present output of the fault rail (VCCINT), mV.
    pub fn vccint_mv(&self, now: Instant) -> f64 {
        match &self.fault_rail {
            Some((bus, r)) => self
                .buses
                .get(bus)
                .and_then(|b| lock(b).rail_state(*r, now))
                .map_or(0.0, |s| s.0),
            None => self.fault_rail_nominal_mv,
        }
    }

    /// Output of any named rail, mV.
    pub fn rail_mv(&self, name: &str, now: Instant) -> Option<f64> {
        let rail = self.board.rail(name)?;
        let bus = self.rail_bus_path(rail);
        let r = Bus::rail_ref(rail);
        self.buses
            .get(&bus)
            .and_then(|b| lock(b).rail_state(r, now))
            .map(|s| s.0)
    }

    /// PL power domain state (`xmutil pwrctl`), from the sequencer on the bus.
    pub fn pl_on(&self) -> bool {
        self.buses.values().all(|b| lock(b).pl_on())
    }

    pub fn ambient(&self) -> f64 {
        *lock(&self.ambient_c)
    }

    /// PDU outlet off: everything volatile is lost.
    pub fn power_off(&self) {
        let mut l = lock(&self.life);
        if !l.outlet_on {
            return;
        }
        l.outlet_on = false;
        l.life = Life::Off;
        l.off_since = Some(Instant::now());
        l.boot_until = None;
        self.console.clear();
        if let Err(e) = self.mem.wipe() {
            tracing::warn!(error = %e, "wiping the memory file failed");
        }
        drop(l);
        self.end_busy();
        tracing::info!("power off");
        self.bump(false);
    }

    /// PDU outlet on. A too-short off leaves the sequencer locked (UG1091).
    pub fn power_on(&self) {
        let mut l = lock(&self.life);
        if l.outlet_on {
            return;
        }
        l.outlet_on = true;
        let now = Instant::now();
        let off_for = l
            .off_since
            .map_or(Duration::MAX, |s| now.saturating_duration_since(s));
        if off_for < Duration::from_millis(self.p.min_off_ms) {
            l.life = Life::Locked;
            tracing::warn!(
                off_ms = off_for.as_millis() as u64,
                min_off_ms = self.p.min_off_ms,
                "power-on after a too-short off: sequencer locked"
            );
        } else {
            l.life = Life::Booting;
            let until = now + Duration::from_millis(self.p.boot_ms);
            l.boot_until = Some(until);
            l.kernel_t0 = now + Duration::from_millis(self.p.boot_ms * 35 / 100);
            for b in self.buses.values() {
                lock(b).reset();
            }
            self.console.boot_log(now, until);
            tracing::info!(boot_ms = self.p.boot_ms, "power on: booting");
        }
        drop(l);
        self.bump(false);
    }

    /// Board-level crash: kernel panic text (if `panic`), then nothing answers.
    pub fn crash(&self, reason: &str, panic: bool) {
        let mut l = lock(&self.life);
        if !matches!(l.life, Life::Up | Life::Booting) {
            return;
        }
        l.life = Life::Crashed;
        let uptime = Instant::now()
            .saturating_duration_since(l.kernel_t0)
            .as_secs_f64();
        drop(l);
        self.console.clear();
        if panic {
            self.console.panic(uptime);
        }
        self.end_busy();
        tracing::warn!(reason, "board crashed");
        self.bump(false);
    }

    fn end_busy(&self) {
        let mut a = lock(&self.activity);
        let now = Instant::now();
        if let Some(s) = a.busy_since.take() {
            a.busy_total += now.saturating_duration_since(s);
        }
    }

    /// After a rail write: the board goes down if VCCINT is below Vcrash or any SOM rail
    /// was switched off (the sequencer sees power-good drop and rolls back).
    pub fn check_rails(&self) {
        let now = Instant::now();
        for rail in &self.board.rails {
            let path = self.rail_bus_path(rail);
            let r = Bus::rail_ref(rail);
            let Some((_, target, enabled)) = self
                .buses
                .get(&path)
                .and_then(|b| lock(b).rail_state(r, now))
            else {
                continue;
            };
            if !enabled {
                self.crash(&format!("rail {} switched off", rail.name), false);
                return;
            }
            if rail.name == self.p.fault_rail && target < self.thresholds.vcrash_mv {
                self.crash(
                    &format!("{} at {target:.0} mV, below Vcrash", rail.name),
                    true,
                );
                return;
            }
        }
    }

    pub fn rail_bus_path(&self, rail: &proto::board::Rail) -> PathBuf {
        match &rail.bus {
            proto::board::I2cBus::Socket(p) | proto::board::I2cBus::Dev(p) => {
                proto::board::resolve(&self.state_dir, p)
            }
        }
    }

    /// Boot finished: load the firmware state (pristine models, idle accelerator).
    pub fn finish_boot(&self) {
        let mut l = lock(&self.life);
        if l.life != Life::Booting {
            return;
        }
        for s in &self.slots {
            if let Some(m) = &s.model
                && let Err(e) = self.mem.write(s.addr, m.pristine())
            {
                tracing::error!(model = %s.name, error = %e, "cannot preload model");
            }
        }
        crate::accel::init_registers(self);
        l.life = Life::Up;
        l.boot_until = None;
        let uptime = Instant::now()
            .saturating_duration_since(l.kernel_t0)
            .as_secs_f64();
        // The next epoch is the one the listeners belong to.
        let epoch = self.epoch.load(Ordering::Acquire) + 1;
        {
            let mut ls = lock(&self.i2c_listeners);
            ls.clear();
            for path in self.buses.keys() {
                let _ = std::fs::remove_file(path);
                match std::os::unix::net::UnixListener::bind(path) {
                    Ok(li) if li.set_nonblocking(true).is_ok() => {
                        ls.insert(path.clone(), (epoch, li));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "cannot bind the I2C socket")
                    }
                }
            }
        }
        self.bump(true);
        drop(l);
        self.console.login_prompt(uptime);
        tracing::info!("board up");
    }

    /// Supervisor: completes boots at their deadline and emits printk noise.
    pub fn supervise(self: &Arc<Self>) {
        let mut rng = crate::physics::rng_for(self.seed, crate::physics::TAG_CONSOLE, 0);
        let mut next_noise: Option<Instant> = None;
        loop {
            if self.stopping() {
                return;
            }
            let now = Instant::now();
            let l = lock(&self.life);
            let (life, until, kt0) = (l.life, l.boot_until, l.kernel_t0);
            if life == Life::Booting
                && let Some(u) = until
                && now >= u
            {
                drop(l);
                self.finish_boot();
                continue;
            }
            if life == Life::Up && self.p.printk_interval_s > 0.0 {
                match next_noise {
                    None => {
                        next_noise = Some(now + exp_interval(&mut rng, self.p.printk_interval_s))
                    }
                    Some(t) if now >= t => {
                        self.console
                            .noise(&mut rng, now.saturating_duration_since(kt0).as_secs_f64());
                        next_noise = Some(now + exp_interval(&mut rng, self.p.printk_interval_s));
                    }
                    _ => {}
                }
            } else {
                next_noise = None;
            }
            let mut wait = Duration::from_millis(500);
            if let Some(u) = until.filter(|_| life == Life::Booting) {
                wait = wait.min(u.saturating_duration_since(now));
            }
            if let Some(t) = next_noise {
                wait = wait.min(t.saturating_duration_since(now));
            }
            let _ = self
                .life_cv
                .wait_timeout(l, wait.max(Duration::from_millis(1)));
        }
    }
}

fn exp_interval(r: &mut rand_chacha::ChaCha8Rng, mean_s: f64) -> Duration {
    use rand::Rng;
    let u: f64 = r.random::<f64>().max(1e-9);
    Duration::from_secs_f64((-u.ln() * mean_s).min(3600.0))
}
