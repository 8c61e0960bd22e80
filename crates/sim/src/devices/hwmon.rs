//! A directory laid out like `/sys/class/hwmon`: `hwmon0` is the INA260 (`ina260_u14`),
//! `hwmon1` the AMS (`ams`). Values come from the power and thermal model, refreshed
//! at the sensors' own rates; each file is replaced atomically (write + rename) and
//! only when its value changed. A board that is off or crashed has frozen files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::board::{Life, Shared, lock};
use crate::physics::power::{Ina260Sample, Load, Thermal, ams_mc, ams_mv, gauss, som_power_w};
use crate::physics::{TAG_NOISE, rng_for};

/// Static AMS channels (mV): the supplies nothing in the emulator moves. Rails of the
/// board file with an `ams_channel` override their channel; in19/in23 (PL SYSMON view
/// of VCCINT/VCCBRAM) mirror in3/in4.
const AMS_STATIC: &[(u32, f64)] = &[
    (1, 1200.0),  // VCC_PSPLL
    (2, 0.0),     // VCC_PSBATT (no battery)
    (3, 850.0),   // VCCINT
    (4, 850.0),   // VCCBRAM
    (5, 1800.0),  // VCCAUX
    (6, 1800.0),  // VCC_PSDDR_PLL
    (7, 850.0),   // VCC_PSINTFP_DDR
    (8, 850.0),   // PS LPD
    (9, 850.0),   // PS FPD
    (10, 1800.0), // PS AUX
    (11, 1200.0), // DDR I/O
    (12, 1800.0), // bank 503
    (13, 1800.0), // bank 500
    (14, 1800.0), // VCCO_PSIO1
    (15, 1800.0), // VCCO_PSIO2
    (16, 850.0),  // VCC_PS_GTR
    (17, 1800.0), // VTT_PS_GTR
    (18, 1800.0), // VCC_PSADC
    (19, 850.0),  // PL VCCINT
    (20, 1800.0), // PL VCCAUX
    (21, 1250.0), // Vref+
    (22, 0.0),    // Vref-
    (23, 850.0),  // PL VCCBRAM
    (24, 850.0),  // VCC_PSINTLP
    (25, 850.0),  // VCC_PSINTFP
    (26, 1800.0), // PS AUX
    (27, 1800.0), // VCCADC
];

pub struct Hwmon {
    pub root: PathBuf,
    ina: PathBuf,
    ams: PathBuf,
    written: HashMap<PathBuf, i64>,
}

impl Hwmon {
    pub fn create(root: &Path, power_name: &str, ams_name: &str) -> std::io::Result<Hwmon> {
        let ina = root.join("hwmon0");
        let ams = root.join("hwmon1");
        std::fs::create_dir_all(&ina)?;
        std::fs::create_dir_all(&ams)?;
        std::fs::write(ina.join("name"), format!("{power_name}\n"))?;
        std::fs::write(ams.join("name"), format!("{ams_name}\n"))?;
        Ok(Hwmon {
            root: root.to_path_buf(),
            ina,
            ams,
            written: HashMap::new(),
        })
    }

    fn put(&mut self, path: PathBuf, v: i64) {
        if self.written.get(&path) == Some(&v) {
            return;
        }
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, format!("{v}\n"))
            .and_then(|_| std::fs::rename(&tmp, &path))
            .is_ok()
        {
            self.written.insert(path, v);
        }
    }
}

pub fn run(sh: Arc<Shared>, mut h: Hwmon) {
    let p = sh.p.clone();
    let mut rng = rng_for(sh.seed, TAG_NOISE, 0);
    let mut thermal = Thermal::new(sh.ambient());
    let ina_period = Duration::from_micros(p.ina260_period_us.max(140));
    let ams_period = Duration::from_millis(p.ams_period_ms.max(1));
    let mut last = Instant::now();
    let mut last_busy = lock(&sh.activity).total(last);
    let mut next_ams = last;
    // Idle boards publish at `IDLE_PUBLISH` unless the true values move: the INA260
    // conversions keep running on hardware, but nothing a reader could act on changes,
    // and rewriting 30 files a few hundred times a second would cost more CPU than the
    // board's whole idle budget.
    const IDLE_PUBLISH: Duration = Duration::from_millis(100);
    let mut last_busy_at = last;
    let mut published: Option<(Instant, f64, f64)> = None;
    let mut ams_channels: Vec<(u32, Option<String>)> =
        AMS_STATIC.iter().map(|(c, _)| (*c, None)).collect();
    for rail in &sh.board.rails {
        if let Some(ch) = rail.ams_channel.as_deref().and_then(|c| {
            c.strip_prefix("in")?
                .strip_suffix("_input")?
                .parse::<u32>()
                .ok()
        }) && let Some(slot) = ams_channels.iter_mut().find(|(c, _)| *c == ch)
        {
            slot.1 = Some(rail.name.clone());
        }
    }
    while !sh.stopping() {
        let now = Instant::now();
        let dt = now.saturating_duration_since(last).as_secs_f64();
        let busy_total = lock(&sh.activity).total(now);
        let busy = if dt > 0.0 {
            (busy_total - last_busy).as_secs_f64() / dt
        } else {
            0.0
        };
        last = now;
        last_busy = busy_total;
        let (life, _) = sh.life();
        let powered = !matches!(life, Life::Off);
        let vccint = sh.vccint_mv(now);
        let ambient = sh.ambient();
        let watts = if powered {
            som_power_w(
                &p,
                Load {
                    vccint_mv: vccint,
                    nominal_mv: sh.fault_rail_nominal_mv,
                    busy,
                    die_c: thermal.die_c,
                },
            )
        } else {
            0.0
        };
        thermal.step(&p, ambient, watts, dt);
        if busy > 0.0 {
            last_busy_at = now;
        }
        let idle = now.saturating_duration_since(last_busy_at) > Duration::from_secs(1);
        let due = match published {
            None => true,
            Some((t, w, v)) => {
                !idle
                    || now.saturating_duration_since(t) >= IDLE_PUBLISH
                    || (w - watts).abs() > 0.005
                    || (v - vccint).abs() > 0.5
            }
        };
        if matches!(life, Life::Up | Life::Booting) && !due {
            std::thread::sleep(ina_period);
        } else if matches!(life, Life::Up | Life::Booting) {
            published = Some((now, watts, vccint));
            let s = Ina260Sample::measure(watts, &mut rng);
            {
                let mut v = lock(&sh.sensors);
                v.ina = s;
                v.board_c = thermal.die_c - 8.0;
                v.pmbus_iout_a = (0.35 + 0.05 * busy + 0.01 * gauss(&mut rng)).max(0.0);
            }
            h.put(h.ina.join("power1_input"), s.power_uw());
            h.put(h.ina.join("curr1_input"), s.curr_ma());
            h.put(h.ina.join("in1_input"), s.in_mv());
            if now >= next_ams {
                next_ams = now + if idle { ams_period * 10 } else { ams_period };
                for (ch, rail) in &ams_channels {
                    let nominal = AMS_STATIC
                        .iter()
                        .find(|(c, _)| c == ch)
                        .map_or(0.0, |x| x.1);
                    let v = match (ch, rail) {
                        (_, Some(name)) => sh.rail_mv(name, now).unwrap_or(nominal),
                        (19, None) => ams_channels
                            .iter()
                            .find(|(c, _)| *c == 3)
                            .and_then(|(_, r)| r.as_ref())
                            .and_then(|n| sh.rail_mv(n, now))
                            .unwrap_or(nominal),
                        (23, None) => ams_channels
                            .iter()
                            .find(|(c, _)| *c == 4)
                            .and_then(|(_, r)| r.as_ref())
                            .and_then(|n| sh.rail_mv(n, now))
                            .unwrap_or(nominal),
                        _ => nominal,
                    };
                    let mv = ams_mv(v, &mut rng);
                    h.put(h.ams.join(format!("in{ch}_input")), mv);
                }
                let t = thermal.die_c;
                h.put(h.ams.join("temp1_input"), ams_mc(t - 4.0, &mut rng)); // LPD
                h.put(h.ams.join("temp2_input"), ams_mc(t - 3.0, &mut rng)); // FPD
                h.put(h.ams.join("temp3_input"), ams_mc(t, &mut rng)); // PL
            }
            std::thread::sleep(ina_period);
        } else {
            // Nothing to publish; keep the thermal model cooling at a slow pace.
            let l = lock(&sh.life);
            let _ = sh.life_cv.wait_timeout(l, Duration::from_millis(100));
        }
    }
}
