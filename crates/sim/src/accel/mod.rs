//! The HLS-style accelerator behind the AXI-Lite control block in the memory file.
//!
//! The agent writes the registers through its own `MAP_SHARED` mapping; there is no bus
//! transaction to trap, so this thread polls the control word (adaptively: every
//! `hot_poll_us` for `hot_window_ms` after activity, every `idle_poll_us` otherwise) and
//! re-asserts what software cannot change (read-only registers, status bits, unknown
//! offsets read as zero). Register map and deviations from hardware: docs/sim.md.

pub mod cycles;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::board::RegionKind;

use crate::board::{Life, Shared, lock};
use crate::datapath::{Engine, Upset};
use crate::physics::power::steady_busy_die_c;
use crate::physics::{FaultSpace, upset_rate};

pub const CTRL_START: u32 = 1 << 0;
pub const CTRL_DONE: u32 = 1 << 1;
pub const CTRL_IDLE: u32 = 1 << 2;
pub const CTRL_READY: u32 = 1 << 3;
pub const CTRL_AUTO_RESTART: u32 = 1 << 7;
/// Bits software may write in AP_CTRL.
const CTRL_WRITABLE: u32 = CTRL_START | CTRL_AUTO_RESTART;

/// ERROR register bits.
pub const ERR_READ_DECODE: u32 = 1 << 0;
pub const ERR_WRITE_DECODE: u32 = 1 << 1;
pub const ERR_BAD_MODEL: u32 = 1 << 2;
pub const ERR_DATAPATH: u32 = 1 << 3;

/// VERSION register: 1.0.0 of our kernel.
pub const VERSION: u32 = 0x0001_0000;

/// Most upsets drawn for one inference (the rate model is capped too).
const MAX_UPSETS: usize = 10_000;

/// Absolute register addresses, from the board file.
#[derive(Debug, Clone)]
struct Regs {
    base: u64,
    len: u64,
    input: u64,
    output: u64,
    params: u64,
    model_id: u64,
    error: Option<u64>,
    id: u64,
    version: u64,
    cycles: u64,
}

impl Regs {
    fn of(sh: &Shared) -> Option<Regs> {
        let a = &sh.board.accelerator;
        let r = sh.board.region(&a.region)?;
        let at = |o: u64| r.base + o;
        Some(Regs {
            base: r.base,
            len: r.size,
            input: at(a.regs.input_addr),
            output: at(a.regs.output_addr),
            params: at(a.regs.params_addr),
            model_id: at(a.regs.model_id),
            error: a.regs.error.map(at),
            id: at(a.regs.id),
            version: at(a.regs.version),
            cycles: at(a.regs.cycles),
        })
    }
    fn ctrl(&self) -> u64 {
        self.base
    }
    fn isr(&self) -> u64 {
        self.base + 0x0C
    }
    fn ier(&self) -> u64 {
        self.base + 0x08
    }
    /// Software-writable words other than AP_CTRL.
    fn is_rw(&self, a: u64) -> bool {
        a == self.base + 0x04
            || a == self.ier()
            || a == self.isr()
            || [self.input, self.output, self.params]
                .iter()
                .any(|&r| a == r || a == r + 4)
            || a == self.model_id
    }
}

/// Power-on state of the control block.
pub fn init_registers(sh: &Shared) {
    let Some(r) = Regs::of(sh) else { return };
    let _ = sh.mem.zero(r.base, r.len);
    let _ = sh.mem.store32(r.ctrl(), CTRL_IDLE);
    let _ = sh.mem.store32(r.id, sh.board.accelerator.id);
    let _ = sh.mem.store32(r.version, VERSION);
}

struct Run {
    epoch: u64,
    started: Instant,
    deadline: Instant,
    cycles: u64,
    output: Option<(u64, Vec<u8>)>,
    error: u32,
    hung: bool,
}

struct Accel {
    sh: Arc<Shared>,
    r: Regs,
    engines: HashMap<u32, Engine>,
    spaces: HashMap<u32, FaultSpace>,
    model_cycles: HashMap<u32, u64>,
    /// What the read-only parts show.
    status: u32,
    cycles_shown: u64,
    error_shown: u32,
    run: Option<Run>,
    last_activity: Option<Instant>,
    last_scan: Instant,
    pl_was_on: bool,
}

pub fn run(sh: Arc<Shared>) {
    // The default 50 us timer slack would double the 50 us hot poll and blur the
    // modelled latency; this thread's sleeps are few and deliberate.
    if let Err(e) = nix::sys::prctl::set_timerslack(1_000) {
        tracing::debug!(error = %e, "cannot reduce timer slack");
    }
    let Some(r) = Regs::of(&sh) else {
        tracing::error!("accelerator region missing; accelerator thread not started");
        return;
    };
    let mut a = Accel {
        sh,
        r,
        engines: HashMap::new(),
        spaces: HashMap::new(),
        model_cycles: HashMap::new(),
        status: CTRL_IDLE,
        cycles_shown: 0,
        error_shown: 0,
        run: None,
        last_activity: None,
        last_scan: Instant::now(),
        pl_was_on: true,
    };
    a.main_loop();
}

impl Accel {
    fn main_loop(&mut self) {
        let p = self.sh.p.clone();
        let mut seen_epoch = u64::MAX;
        while !self.sh.stopping() {
            let (life, epoch) = self.sh.life();
            if life != Life::Up {
                // Frozen: a dead board's registers do not change.
                self.run = None;
                let l = lock(&self.sh.life);
                let _ = self.sh.life_cv.wait_timeout(l, Duration::from_millis(200));
                continue;
            }
            if epoch != seen_epoch {
                // Fresh boot: registers were re-initialised by finish_boot.
                seen_epoch = epoch;
                self.run = None;
                self.status = CTRL_IDLE;
                self.cycles_shown = 0;
                self.error_shown = 0;
            }
            if !self.sh.pl_on() {
                self.pl_off();
                continue;
            }
            if !self.pl_was_on {
                // PL back on: the kernel comes up reset and idle (bitstream reload is
                // not modelled); DDR keeps its contents.
                self.pl_was_on = true;
                init_registers(&self.sh);
                self.status = CTRL_IDLE;
                self.cycles_shown = 0;
                self.error_shown = 0;
            }
            let now = Instant::now();
            self.enforce();
            let mut sleep = Duration::from_micros(p.idle_poll_us.max(50));
            match &self.run {
                None => {
                    let ctrl = self.sh.mem.load32(self.r.ctrl()).unwrap_or(0);
                    if ctrl & CTRL_START != 0 {
                        self.start(now, epoch);
                        continue;
                    }
                }
                Some(run) if run.epoch != epoch => self.run = None,
                Some(run) if run.hung => {
                    let c = (now - run.started).as_secs_f64()
                        * self.sh.board.accelerator.clock_hz as f64;
                    self.show_cycles(c as u64);
                    sleep = Duration::from_millis(5);
                }
                Some(run) => {
                    if now >= run.deadline {
                        self.finish(epoch);
                        continue;
                    }
                    let c = (now - run.started).as_secs_f64()
                        * self.sh.board.accelerator.clock_hz as f64;
                    let (total, deadline) = (run.cycles, run.deadline);
                    self.show_cycles((c as u64).min(total));
                    sleep = (deadline - now).min(Duration::from_millis(5));
                }
            }
            if self.run.is_none()
                && self
                    .last_activity
                    .is_some_and(|t| now - t < Duration::from_millis(p.hot_window_ms))
            {
                sleep = sleep.min(Duration::from_micros(p.hot_poll_us.max(1)));
            }
            std::thread::sleep(sleep);
        }
    }

    /// PL powered down: the control block is gone (any hang with it). Reads of the window
    /// give zeros here; a *write* to it reaches an AXI slave that does not answer, which
    /// on a ZynqMP ends in an asynchronous SError: kernel panic.
    fn pl_off(&mut self) {
        let r = &self.r;
        if self.pl_was_on {
            self.pl_was_on = false;
            self.run = None;
            let _ = self.sh.mem.zero(r.base, r.len);
            let mut a = lock(&self.sh.activity);
            if let Some(s) = a.busy_since.take() {
                a.busy_total += Instant::now().saturating_duration_since(s);
            }
            tracing::info!("PL powered off");
        } else if (r.base..r.base + r.len)
            .step_by(4)
            .any(|a| self.sh.mem.load32(a).is_ok_and(|v| v != 0))
        {
            self.sh
                .crash("write to the PL while it is powered off", true);
            return;
        }
        std::thread::sleep(Duration::from_micros(self.sh.p.idle_poll_us.max(50)));
    }

    fn show_cycles(&mut self, c: u64) {
        self.cycles_shown = c;
        let _ = self.sh.mem.store32(self.r.cycles, c as u32);
        let _ = self.sh.mem.store32(self.r.cycles + 4, (c >> 32) as u32);
    }

    /// Undo what software cannot do on hardware: writes to read-only registers or status
    /// bits, and values at offsets with no register (read as zero).
    fn enforce(&mut self) {
        let (m, r) = (&self.sh.mem, &self.r);
        let running = self.run.is_some();
        let ro = if running { CTRL_START } else { self.status };
        if let Ok(v) = m.load32(r.ctrl()) {
            let keep = if running {
                CTRL_AUTO_RESTART
            } else {
                CTRL_WRITABLE
            };
            let want = (v & keep) | ro;
            if want != v {
                let _ = m.update32(r.ctrl(), |v| (v & keep) | ro);
            }
        }
        // The known read-only words every poll; the whole window (offsets with no
        // register) every 20 ms, which is plenty for a stray write and keeps idle polls cheap.
        let now = Instant::now();
        let full = now.saturating_duration_since(self.last_scan) >= Duration::from_millis(20);
        if full {
            self.last_scan = now;
        }
        let mut fixed = vec![r.id, r.version, r.cycles, r.cycles + 4];
        fixed.extend(r.error);
        let words: Box<dyn Iterator<Item = u64>> = if full {
            Box::new((r.base + 4..r.base + r.len).step_by(4))
        } else {
            Box::new(fixed.into_iter())
        };
        for a in words {
            let expect = if r.is_rw(a) {
                None
            } else if a == r.id {
                Some(self.sh.board.accelerator.id)
            } else if a == r.version {
                Some(VERSION)
            } else if a == r.cycles {
                Some(self.cycles_shown as u32)
            } else if a == r.cycles + 4 {
                Some((self.cycles_shown >> 32) as u32)
            } else if Some(a) == r.error {
                Some(self.error_shown)
            } else {
                Some(0)
            };
            if let Some(e) = expect
                && m.load32(a).is_ok_and(|v| v != e)
            {
                tracing::debug!(
                    offset = a - r.base,
                    "write to a read-only or unmapped register ignored"
                );
                let _ = m.store32(a, e);
            }
        }
    }

    fn arg64(&self, a: u64) -> u64 {
        let lo = self.sh.mem.load32(a).unwrap_or(0) as u64;
        let hi = self.sh.mem.load32(a + 4).unwrap_or(0) as u64;
        lo | (hi << 32)
    }

    /// A DDR range the engine's AXI masters can reach (decode error otherwise).
    fn ddr_ok(&self, addr: u64, len: usize) -> bool {
        self.sh
            .board
            .region_at(addr, len as u64)
            .is_some_and(|reg| reg.kind != RegionKind::Registers)
            && self.sh.mem.contains(addr, len as u64)
    }

    fn read_ddr(&self, addr: u64, len: usize, error: &mut u32) -> Vec<u8> {
        if self.ddr_ok(addr, len) {
            self.sh
                .mem
                .read_vec(addr, len)
                .unwrap_or_else(|_| vec![0; len])
        } else {
            // DECERR: the HLS core ignores RRESP and computes on what it got (zeros here).
            *error |= ERR_READ_DECODE;
            vec![0; len]
        }
    }

    fn start(&mut self, now: Instant, epoch: u64) {
        let sh = self.sh.clone();
        let counter = sh
            .inferences
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.last_activity = Some(now);
        self.run = Some(Run {
            epoch,
            started: now,
            deadline: now,
            cycles: 0,
            output: None,
            error: 0,
            hung: false,
        });
        self.error_shown = 0;
        self.show_cycles(0);
        self.enforce(); // shows start=1, idle=0, done=0
        lock(&sh.activity).busy_since = Some(now);

        let input_addr = self.arg64(self.r.input);
        let output_addr = self.arg64(self.r.output);
        let params_addr = self.arg64(self.r.params);
        let id = sh.mem.load32(self.r.model_id).unwrap_or(u32::MAX);
        let clock = sh.board.accelerator.clock_hz.max(1) as f64;
        let mut error = 0u32;

        let model = sh.slots.get(id as usize).and_then(|s| s.model.clone());
        let Some(model) = model else {
            let cycles = sh.p.layer_overhead_cycles;
            let run = self.run.as_mut().expect("set above");
            run.error = ERR_BAD_MODEL;
            run.cycles = cycles;
            run.deadline = now + Duration::from_secs_f64(cycles as f64 / clock);
            tracing::debug!(model_id = id, "ap_start with an unknown model id");
            return;
        };
        let params = self.read_ddr(params_addr, model.manifest().params_bytes, &mut error);
        let input = self.read_ddr(input_addr, model.input_bytes(), &mut error);
        if !self.ddr_ok(output_addr, model.output_bytes()) {
            error |= ERR_WRITE_DECODE;
        }

        let v = sh.vccint_mv(now);
        if v < sh.thresholds.vhang_mv {
            let run = self.run.as_mut().expect("set above");
            run.hung = true;
            tracing::info!(vccint_mv = v, "accelerator hung (below Vhang)");
            return;
        }
        let space = self.spaces.entry(id).or_insert_with(|| {
            let bits = if model.manifest().input.dtype == proto::manifest::DType::F32 {
                32
            } else {
                8
            };
            FaultSpace::new(&model.node_macs(), &model.node_output_elements(), bits)
        });
        let t = steady_busy_die_c(&sh.p, sh.ambient(), v, sh.fault_rail_nominal_mv);
        let lambda = upset_rate(&sh.p, &sh.thresholds, v, t, space.total_macs);
        let upsets: Vec<Upset> = space.draw(sh.seed, counter, lambda, MAX_UPSETS);
        if !upsets.is_empty() {
            tracing::debug!(
                counter,
                vccint_mv = v,
                lambda,
                upsets = upsets.len(),
                "datapath upsets"
            );
        }
        let engine = self
            .engines
            .entry(id)
            .or_insert_with(|| Engine::new(model.clone()));
        let output = match engine.run(&params, &input, &upsets) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!(error = %e, "datapath refused the run");
                error |= ERR_DATAPATH;
                None
            }
        };
        let cycles = *self
            .model_cycles
            .entry(id)
            .or_insert_with(|| cycles::model_cycles(model.manifest(), &sh.p));
        let run = self.run.as_mut().expect("set above");
        run.cycles = cycles;
        run.deadline = now + Duration::from_secs_f64(cycles as f64 / clock);
        run.error = error;
        if error & ERR_WRITE_DECODE == 0 {
            run.output = output.map(|o| (output_addr, o));
        }
    }

    fn finish(&mut self, epoch: u64) {
        let sh = self.sh.clone();
        let now = Instant::now();
        if sh.vccint_mv(now) < sh.thresholds.vhang_mv {
            if let Some(r) = self.run.as_mut() {
                r.hung = true;
            }
            return;
        }
        let Some(run) = self.run.take() else { return };
        if run.epoch != epoch {
            return;
        }
        if let Some((addr, out)) = &run.output {
            let _ = sh.mem.write(*addr, out);
        }
        self.error_shown = run.error;
        if let Some(e) = self.r.error {
            let _ = sh.mem.store32(e, run.error);
        }
        self.show_cycles(run.cycles);
        let ier = sh.mem.load32(self.r.ier()).unwrap_or(0);
        let isr_set = (if ier & 1 != 0 { 1 } else { 0 }) | (if ier & 2 != 0 { 2 } else { 0 });
        if isr_set != 0 {
            let _ = sh.mem.update32(self.r.isr(), |v| v | isr_set);
        }
        self.status = CTRL_DONE | CTRL_IDLE | CTRL_READY;
        let _ = sh.mem.update32(self.r.ctrl(), |v| {
            (v & CTRL_AUTO_RESTART) | CTRL_DONE | CTRL_IDLE | CTRL_READY
        });
        {
            let mut a = lock(&sh.activity);
            if let Some(s) = a.busy_since.take() {
                a.busy_total += now.saturating_duration_since(s);
            }
        }
        self.last_activity = Some(now);
        // auto_restart: the core starts again by itself.
        if sh.mem.load32(self.r.ctrl()).unwrap_or(0) & CTRL_AUTO_RESTART != 0 {
            let _ = sh.mem.update32(self.r.ctrl(), |v| v | CTRL_START);
        }
    }
}
