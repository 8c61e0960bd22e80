//! Interlocks, enforced locally whatever the controller asks:
//! - a set-point outside a rail's hard limits is refused (never clamped);
//! - voltages move in steps of at most `step_mv`, with `settle_ms` after each step and a
//!   read-back through the regulator (and AMS, when the rail has a channel);
//! - nominal voltages are restored at job end, on controller loss, on SIGTERM/SIGINT and
//!   from the panic hook ([`Restorer`] opens its own bus handles, so it works even when
//!   the thread that panicked held the shared ones).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use proto::board::{BoardFile, Rail, RailDriver};

use crate::board::{RailHandle, Sensors, open_rails};
use crate::hw::regulator::RegulatorError;

#[derive(Debug, thiserror::Error)]
pub enum VoltageError {
    /// The request itself is not allowed: reported as a `Refused` record.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Regulator(#[from] RegulatorError),
    #[error("{rail}: set {want} mV but the regulator reads back {got} mV")]
    Readback { rail: String, want: u32, got: f32 },
}

/// Why `mv` may not be set on `rail`, if it may not.
pub fn check_setpoint(rail: &Rail, mv: u32) -> Result<(), String> {
    if mv < rail.min_mv || mv > rail.max_mv {
        return Err(format!(
            "{} {mv} mV is outside the hard limits {}..={} mV",
            rail.name, rail.min_mv, rail.max_mv
        ));
    }
    if rail.driver == RailDriver::Da913x && !mv.is_multiple_of(10) {
        return Err(format!(
            "{} {mv} mV is not a multiple of the DA913x 10 mV step",
            rail.name
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Readback {
    /// What the regulator reports (programmed code or READ_VOUT), mV.
    pub regulator_mv: f32,
    /// AMS measurement, mV, if the rail has a channel.
    pub ams_mv: Option<f32>,
}

fn tolerance_mv(rail: &Rail) -> f32 {
    match rail.driver {
        RailDriver::Da913x => 0.5,
        // READ_VOUT is a measurement.
        RailDriver::Pmbus => (rail.step_mv as f32).max(5.0),
    }
}

/// Walk a rail to `target` (mV) in allowed steps, settling and reading back each step.
/// `check` = false only for restoring nominal from an out-of-limits state (moving toward
/// nominal is always allowed).
pub fn walk(
    h: &mut RailHandle,
    sensors: Option<&mut Sensors>,
    target: u32,
    check: bool,
) -> Result<Readback, VoltageError> {
    if check {
        check_setpoint(&h.cfg, target).map_err(VoltageError::Refused)?;
    }
    let step = h.cfg.step_mv.max(1);
    let mut cur = h.reg.read_mv()?.round() as i64;
    let tgt = i64::from(target);
    let mut rb = Readback {
        regulator_mv: cur as f32,
        ams_mv: None,
    };
    while cur != tgt {
        let delta = (tgt - cur).clamp(-i64::from(step), i64::from(step));
        let next = cur + delta;
        let next_mv = u32::try_from(next).map_err(|_| {
            VoltageError::Refused(format!(
                "{}: step to {next} mV is not a voltage",
                h.cfg.name
            ))
        })?;
        h.reg.set_mv(next_mv)?;
        std::thread::sleep(Duration::from_millis(u64::from(h.cfg.settle_ms)));
        let got = h.reg.read_mv()?;
        if (got - next_mv as f32).abs() > tolerance_mv(&h.cfg) {
            return Err(VoltageError::Readback {
                rail: h.cfg.name.clone(),
                want: next_mv,
                got,
            });
        }
        rb.regulator_mv = got;
        cur = next;
    }
    if let Some(s) = sensors {
        rb.ams_mv = s.rail_mv(&h.cfg.name, true);
    }
    Ok(rb)
}

/// Restores nominal on every rail through freshly opened bus handles.
#[derive(Debug, Clone)]
pub struct Restorer {
    file: BoardFile,
    root: PathBuf,
}

impl Restorer {
    pub fn new(file: BoardFile, root: &Path) -> Restorer {
        Restorer {
            file,
            root: root.to_path_buf(),
        }
    }

    /// Every rail back to nominal; returns the errors (rail, message), empty if all went.
    pub fn restore_nominal(&self) -> Vec<(String, String)> {
        let mut errs = Vec::new();
        match open_rails(&self.file, &self.root) {
            Ok(mut rails) => {
                for h in rails.iter_mut() {
                    let nominal = h.cfg.nominal_mv;
                    if let Err(e) = walk(h, None, nominal, false) {
                        errs.push((h.cfg.name.clone(), e.to_string()));
                    }
                }
            }
            Err(e) => errs.push(("*".into(), e.to_string())),
        }
        errs
    }
}

static PANIC_RESTORER: OnceLock<Restorer> = OnceLock::new();

/// On any panic: log it, walk every rail back to nominal, exit with 101. A panicking
/// agent must not leave the board undervolted.
pub fn install_panic_hook(r: Restorer) {
    let _ = PANIC_RESTORER.set(r);
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!(panic = %info, "Agent panicked; restoring nominal voltages");
        prev(info);
        if let Some(r) = PANIC_RESTORER.get() {
            for (rail, e) in r.restore_nominal() {
                tracing::error!(rail = %rail, error = %e, "Could not restore nominal after panic");
            }
        }
        std::process::exit(101);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::board::I2cBus;

    fn rail() -> Rail {
        Rail {
            name: "vccint".into(),
            driver: RailDriver::Da913x,
            bus: I2cBus::Socket("x".into()),
            address: 0x32,
            register: 0x25,
            nominal_mv: 850,
            min_mv: 500,
            max_mv: 900,
            step_mv: 10,
            settle_ms: 1,
            ams_channel: None,
        }
    }

    #[test]
    fn limits_are_refused_with_reasons() {
        let r = rail();
        assert!(check_setpoint(&r, 850).is_ok());
        assert!(check_setpoint(&r, 500).is_ok());
        let e = check_setpoint(&r, 490).unwrap_err();
        assert!(e.contains("490") && e.contains("500..=900"), "{e}");
        assert!(check_setpoint(&r, 910).is_err());
        assert!(check_setpoint(&r, 855).unwrap_err().contains("10 mV"));
    }
}
