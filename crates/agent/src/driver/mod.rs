//! The HLS accelerator's `s_axilite` control protocol (UG1399): argument registers from
//! 0x10 (64-bit addresses as lo/hi words), AP_CTRL at 0x00 (bit0 ap_start, bit1 ap_done
//! clear-on-read, bit2 ap_idle, bit7 auto_restart), a read-only ID, version and a 64-bit
//! cycle counter (restarted by ap_start, frozen at ap_done). A hang (no ap_done within the timeout) is an outcome, not an error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::board::AccelRegs;

use crate::hw::devmem::{MmioError, MmioWindow};

pub const AP_CTRL: u64 = 0x00;
pub const AP_START: u32 = 1 << 0;
pub const AP_DONE: u32 = 1 << 1;
pub const AP_IDLE: u32 = 1 << 2;
pub const AUTO_RESTART: u32 = 1 << 7;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RunResult {
    Done {
        latency: Duration,
        cycles: u64,
        /// The kernel's ERROR register after the run (0 = fine).
        error: u32,
    },
    Hang {
        waited: Duration,
    },
}

pub struct Hls {
    regs: Arc<MmioWindow>,
    r: AccelRegs,
    pub clock_hz: u64,
}

impl Hls {
    pub fn new(regs: Arc<MmioWindow>, r: AccelRegs, clock_hz: u64) -> Hls {
        Hls { regs, r, clock_hz }
    }

    pub fn id(&self) -> Result<u32, MmioError> {
        self.regs.read32(self.r.id)
    }

    pub fn version(&self) -> Result<u32, MmioError> {
        self.regs.read32(self.r.version)
    }

    pub fn error_flags(&self) -> Result<u32, MmioError> {
        match self.r.error {
            Some(o) => self.regs.read32(o),
            None => Ok(0),
        }
    }

    fn write64(&self, off: u64, v: u64) -> Result<(), MmioError> {
        self.regs.write32(off, v as u32)?;
        self.regs.write32(off + 4, (v >> 32) as u32)
    }

    pub fn cycles(&self) -> Result<u64, MmioError> {
        // Re-read hi to catch a carry between the two word reads.
        loop {
            let hi = self.regs.read32(self.r.cycles + 4)?;
            let lo = self.regs.read32(self.r.cycles)?;
            if self.regs.read32(self.r.cycles + 4)? == hi {
                return Ok((u64::from(hi) << 32) | u64::from(lo));
            }
        }
    }

    /// Program the argument registers.
    pub fn configure(
        &self,
        input: u64,
        output: u64,
        params: u64,
        model_id: u32,
    ) -> Result<(), MmioError> {
        self.write64(self.r.input_addr, input)?;
        self.write64(self.r.output_addr, output)?;
        self.write64(self.r.params_addr, params)?;
        self.regs.write32(self.r.model_id, model_id)
    }

    pub fn is_idle(&self) -> Result<bool, MmioError> {
        Ok(self.regs.read32(AP_CTRL)? & AP_IDLE != 0)
    }

    /// ap_start, then wait for ap_done up to `timeout`. Buffers must already be written:
    /// the fence orders those writes before the start bit.
    pub fn run(&self, timeout: Duration) -> Result<RunResult, MmioError> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let ctrl = self.regs.read32(AP_CTRL)? & AUTO_RESTART;
        let t0 = Instant::now();
        self.regs.write32(AP_CTRL, ctrl | AP_START)?;
        let mut spins = 0u32;
        loop {
            let v = self.regs.read32(AP_CTRL)?;
            // ap_done is only meaningful once ap_start has been taken (reads 0): on the
            // emulator (and with ap_ctrl_chain) done is not clear-on-read, so the previous
            // run's done may still be visible right after our start.
            if v & AP_DONE != 0 && v & AP_START == 0 {
                let latency = t0.elapsed();
                // The kernel's counter restarts at ap_start: after ap_done it holds
                // this run's cycles.
                return Ok(RunResult::Done {
                    latency,
                    cycles: self.cycles()?,
                    error: self.error_flags()?,
                });
            }
            let waited = t0.elapsed();
            if waited >= timeout {
                return Ok(RunResult::Hang { waited });
            }
            // Yield first (short inferences), then sleep in short slices so a waiting
            // agent does not steal a core from the accelerator (or the emulator).
            spins += 1;
            if spins < 50 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(if spins < 500 { 20 } else { 200 }));
            }
        }
    }

    /// Wait until ap_idle (after a hang) for at most `timeout`.
    pub fn wait_idle(&self, timeout: Duration) -> Result<bool, MmioError> {
        let t0 = Instant::now();
        loop {
            if self.is_idle()? {
                return Ok(true);
            }
            if t0.elapsed() >= timeout {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Floor of the hang timeout: a scheduler hiccup on a loaded host (or the emulator's
/// idle poll) must not look like a hang; a real hang waits this long once.
pub const MIN_HANG_TIMEOUT: Duration = Duration::from_millis(250);

/// Hang timeout from golden latencies: `factor` x p99, at least [`MIN_HANG_TIMEOUT`].
pub fn calibrate_timeout(latencies: &[Duration], factor: f32) -> (Duration, Duration) {
    let mut v: Vec<Duration> = latencies.to_vec();
    v.sort();
    let p99 = if v.is_empty() {
        Duration::from_millis(100)
    } else {
        let i = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    };
    let t =
        Duration::from_nanos((p99.as_nanos() as f64 * f64::from(factor.max(1.0))).round() as u64)
            .max(MIN_HANG_TIMEOUT);
    (p99, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_and_timeout() {
        let l: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let (p99, t) = calibrate_timeout(&l, 10.0);
        assert_eq!(p99, Duration::from_millis(99));
        assert_eq!(t, Duration::from_millis(990));
        let (p, t) = calibrate_timeout(&[Duration::from_micros(10)], 2.0);
        assert_eq!(p, Duration::from_micros(10));
        assert_eq!(t, MIN_HANG_TIMEOUT);
    }

    #[test]
    fn registers_on_a_memory_file() {
        // The real driver against a file: argument writes land at the documented offsets,
        // and with nobody raising ap_done the run is a hang, not an error.
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4096).unwrap();
        let w = Arc::new(MmioWindow::open(f.path(), 0, 0, 4096).unwrap());
        let regs = AccelRegs {
            input_addr: 0x10,
            output_addr: 0x1C,
            params_addr: 0x28,
            model_id: 0x34,
            id: 0x40,
            version: 0x44,
            cycles: 0x48,
            error: Some(0x3C),
        };
        let h = Hls::new(w.clone(), regs, 300_000_000);
        h.configure(0x6800_0000, 0x1_6900_0000, 0x6000_0000, 3)
            .unwrap();
        assert_eq!(w.read32(0x10).unwrap(), 0x6800_0000);
        assert_eq!(w.read32(0x1C).unwrap(), 0x6900_0000);
        assert_eq!(w.read32(0x20).unwrap(), 1);
        assert_eq!(w.read32(0x34).unwrap(), 3);
        w.write32(0x48, 0xffff_fff0).unwrap();
        w.write32(0x4C, 2).unwrap();
        assert_eq!(h.cycles().unwrap(), 0x2_ffff_fff0);
        // A stale ap_done with ap_start still set is not completion.
        w.write32(0, AP_DONE | AP_IDLE).unwrap();
        let r = h.run(Duration::from_millis(5)).unwrap();
        assert!(matches!(r, RunResult::Hang { .. }));
        assert_eq!(w.read32(0).unwrap() & AP_START, AP_START);
    }
}
