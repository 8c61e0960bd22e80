//! Power and thermal model behind the INA260 and AMS readings.
//!
//! SOM input power = base (PS, DDR, carrier; mild temperature dependence)
//! + PL leakage (~V^3, doubling every `leak_c_per_double` degC)
//! + PL dynamic (~V^2 f activity; idle = clock tree only), through a buck at 85 %.
//!
//! One thermal RC (degC/W, tau) from ambient to the die.

use proto::board::SimSection;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Buck efficiency from the 5 V input to the PL rails.
const PL_EFFICIENCY: f64 = 0.85;
pub const NOMINAL_BUS_MV: f64 = 5000.0;
/// Source + cable resistance seen by the SOM input (droop under load).
const SOURCE_OHMS: f64 = 0.03;

#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub vccint_mv: f64,
    pub nominal_mv: f64,
    /// Fraction of the last window the accelerator was busy, 0..=1.
    pub busy: f64,
    pub die_c: f64,
}

/// SOM input power in W.
pub fn som_power_w(p: &SimSection, l: Load) -> f64 {
    let vr = (l.vccint_mv / l.nominal_mv.max(1.0)).max(0.0);
    let leak =
        p.pl_leak_w * vr.powi(3) * 2f64.powf((l.die_c - 25.0) / p.leak_c_per_double.max(1.0));
    let busy = l.busy.clamp(0.0, 1.0);
    let dynamic = (p.pl_dyn_idle_w + (p.pl_dyn_busy_w - p.pl_dyn_idle_w) * busy) * vr * vr;
    let base = p.base_w * (1.0 + 0.002 * (l.die_c - 25.0));
    base + (leak + dynamic) / PL_EFFICIENCY
}

/// Steady-state die temperature under full accelerator load at `vccint_mv`: the
/// temperature the fault model uses (deterministic, see docs/sim.md).
pub fn steady_busy_die_c(p: &SimSection, ambient_c: f64, vccint_mv: f64, nominal_mv: f64) -> f64 {
    // Two fixed-point iterations are plenty: leakage is a small part of the power.
    let mut t = ambient_c;
    for _ in 0..3 {
        let w = som_power_w(
            p,
            Load {
                vccint_mv,
                nominal_mv,
                busy: 1.0,
                die_c: t,
            },
        );
        t = ambient_c + p.thermal_c_per_w * w;
    }
    t
}

#[derive(Debug, Clone)]
pub struct Thermal {
    pub die_c: f64,
}

impl Thermal {
    pub fn new(ambient_c: f64) -> Thermal {
        Thermal { die_c: ambient_c }
    }
    /// Advance by `dt_s` with `power_w` dissipated.
    pub fn step(&mut self, p: &SimSection, ambient_c: f64, power_w: f64, dt_s: f64) {
        let target = ambient_c + p.thermal_c_per_w * power_w;
        let a = 1.0 - (-dt_s / p.thermal_tau_s.max(1e-3)).exp();
        self.die_c += (target - self.die_c) * a;
    }
}

pub fn gauss(r: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = r.random::<f64>().max(1e-300);
    let u2: f64 = r.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// What the INA260 reports for one conversion, in its own LSBs and in hwmon units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ina260Sample {
    pub current_raw: i16,
    pub voltage_raw: u16,
    pub power_raw: u16,
}

impl Ina260Sample {
    /// From true input power (W), with conversion noise.
    pub fn measure(power_w: f64, r: &mut ChaCha8Rng) -> Ina260Sample {
        let i_a = power_w / (NOMINAL_BUS_MV / 1000.0);
        let v_mv = NOMINAL_BUS_MV - i_a * SOURCE_OHMS * 1000.0 + 1.2 * gauss(r);
        let i_ma = power_w * 1000.0 / v_mv * 1000.0 + 2.5 * gauss(r);
        let current_raw = (i_ma / 1.25).round().clamp(-32768.0, 32767.0) as i16;
        let voltage_raw = (v_mv / 1.25).round().clamp(0.0, 65535.0) as u16;
        // The part multiplies its own current and voltage registers.
        let p_mw = f64::from(current_raw) * 1.25 * f64::from(voltage_raw) * 1.25 / 1000.0;
        let power_raw = (p_mw / 10.0).round().clamp(0.0, 65535.0) as u16;
        Ina260Sample {
            current_raw,
            voltage_raw,
            power_raw,
        }
    }
    /// hwmon `curr1_input` (mA), as iio-hwmon prints it (integer).
    pub fn curr_ma(&self) -> i64 {
        (f64::from(self.current_raw) * 1.25) as i64
    }
    /// hwmon `in1_input` (mV).
    pub fn in_mv(&self) -> i64 {
        (f64::from(self.voltage_raw) * 1.25) as i64
    }
    /// hwmon `power1_input` (uW): 10 mW per LSB.
    pub fn power_uw(&self) -> i64 {
        i64::from(self.power_raw) * 10_000
    }
}

/// AMS ADC: 10 bits over 0..3 V (UG1087), so ~2.9 mV steps; one LSB of noise.
pub fn ams_mv(v_mv: f64, r: &mut ChaCha8Rng) -> i64 {
    let code = (v_mv / 3000.0 * 1024.0 + 0.5 * gauss(r))
        .round()
        .clamp(0.0, 1023.0);
    (code * 3000.0 / 1024.0) as i64
}

/// AMS temperature in m°C: 10-bit SYSMON transfer function, ~0.5 degC steps.
pub fn ams_mc(t_c: f64, r: &mut ChaCha8Rng) -> i64 {
    let lsb = 509.3140064 / 1024.0;
    let code = ((t_c + 280.2308787) / lsb + 0.4 * gauss(r)).round();
    ((code * lsb - 280.2308787) * 1000.0) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::physics::{TAG_NOISE, rng_for};

    fn load(v: f64, busy: f64, t: f64) -> Load {
        Load {
            vccint_mv: v,
            nominal_mv: 850.0,
            busy,
            die_c: t,
        }
    }

    #[test]
    fn power_rises_with_load_voltage_and_temperature() {
        let p = SimSection::default();
        assert!(som_power_w(&p, load(850.0, 1.0, 40.0)) > som_power_w(&p, load(850.0, 0.0, 40.0)));
        assert!(som_power_w(&p, load(850.0, 1.0, 40.0)) > som_power_w(&p, load(600.0, 1.0, 40.0)));
        assert!(som_power_w(&p, load(850.0, 0.0, 80.0)) > som_power_w(&p, load(850.0, 0.0, 30.0)));
        assert!(
            steady_busy_die_c(&p, 25.0, 850.0, 850.0) > steady_busy_die_c(&p, 25.0, 600.0, 850.0)
        );
    }

    #[test]
    fn thermal_approaches_target() {
        let p = SimSection::default();
        let mut th = Thermal::new(25.0);
        for _ in 0..1000 {
            th.step(&p, 25.0, 5.0, 1.0);
        }
        assert!((th.die_c - (25.0 + p.thermal_c_per_w * 5.0)).abs() < 0.01);
    }

    #[test]
    fn ina260_units() {
        let mut r = rng_for(1, TAG_NOISE, 0);
        let s = Ina260Sample::measure(5.0, &mut r);
        assert!((s.in_mv() - 4970).abs() < 20, "{}", s.in_mv());
        assert!((s.curr_ma() - 1006).abs() < 20, "{}", s.curr_ma());
        assert!(
            (s.power_uw() - 5_000_000).abs() < 60_000,
            "{}",
            s.power_uw()
        );
        assert_eq!(s.power_uw() % 10_000, 0);
        let t = ams_mc(50.0, &mut r);
        assert!((t - 50_000).abs() < 1500, "{t}");
        let v = ams_mv(850.0, &mut r);
        assert!((v - 850).abs() <= 6, "{v}");
    }
}
