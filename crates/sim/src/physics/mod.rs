//! Undervolting physics: per-board voltage thresholds and the timing-fault model.
//!
//! Regions of VCCINT, from nominal down (Salami et al. DSN 2020 on ZCU102, see
//! docs/sim.md): guardband (no faults) down to `vmin`; below it datapath upsets whose rate
//! grows exponentially as the voltage falls and with temperature; below `vhang` the
//! accelerator's control FSM stops (ap_done never comes); below `vcrash` the whole board
//! goes down. All randomness is drawn from the board seed and a per-inference counter,
//! so the same seed and the same sequence of operations give the same faults.

pub mod power;

use proto::board::SimSection;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::datapath::Upset;

/// splitmix64: decorrelates seeds that differ in one bit (seed, seed+1, ...).
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An RNG for one purpose (`tag`) and one index (e.g. the inference counter).
pub fn rng_for(seed: u64, tag: u64, index: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(
        mix(seed ^ tag.wrapping_mul(0xA24B_AED4_963E_E407)) ^ index
    ))
}

pub const TAG_BOARD: u64 = 1;
pub const TAG_FAULTS: u64 = 2;
pub const TAG_NOISE: u64 = 3;
pub const TAG_CONSOLE: u64 = 4;

/// This board's thresholds (mV), drawn once from the seed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Thresholds {
    pub vmin_mv: f64,
    pub vhang_mv: f64,
    pub vcrash_mv: f64,
}

impl Thresholds {
    pub fn for_board(p: &SimSection, seed: u64) -> Thresholds {
        let mut r = rng_for(seed, TAG_BOARD, 0);
        let s = p.spread_mv.abs();
        let mut u = |k: f64| {
            if s > 0.0 {
                r.random_range(-s * k..=s * k)
            } else {
                0.0
            }
        };
        // A board with a wide guardband is wide everywhere: one common offset, plus a
        // little independent jitter of the lower thresholds.
        let common = u(1.0);
        let vmin = p.vmin_mv + common;
        let vhang = (p.vhang_mv + common + u(0.25)).min(vmin - 1.0);
        // At least one 10 mV regulator step lies in the hang window [vcrash, vhang).
        let vcrash = (p.vcrash_mv + common + u(0.25)).min(vhang - 10.5);
        Thresholds {
            vmin_mv: round3(vmin),
            vhang_mv: round3(vhang),
            vcrash_mv: round3(vcrash),
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Expected upsets in one inference of `macs` MACs at `v_mv` and die temperature `t_c`.
/// Exactly zero at or above Vmin.
pub fn upset_rate(p: &SimSection, th: &Thresholds, v_mv: f64, t_c: f64, macs: u64) -> f64 {
    if v_mv >= th.vmin_mv || macs == 0 {
        return 0.0;
    }
    let dv = (th.vmin_mv - v_mv) / p.fault_mv_per_efold.max(1e-3);
    let dt = (t_c - p.fault_ref_c) / p.fault_c_per_efold.max(1e-3);
    // Capped so a silly parameter set cannot ask for billions of upsets.
    (p.fault_per_mac_at_vmin * macs as f64 * dv.min(50.0).exp() * dt.clamp(-50.0, 50.0).exp())
        .min(1e6)
}

/// Poisson sample (Knuth below 30, normal approximation above).
fn poisson(r: &mut ChaCha8Rng, lambda: f64) -> u64 {
    if lambda <= 0.0 {
        return 0;
    }
    if lambda < 30.0 {
        let l = (-lambda).exp();
        let mut k = 0u64;
        let mut p = 1.0;
        loop {
            p *= r.random::<f64>();
            if p <= l {
                return k;
            }
            k += 1;
        }
    }
    let (u1, u2): (f64, f64) = (r.random::<f64>().max(1e-300), r.random());
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    (lambda + z * lambda.sqrt()).round().max(0.0) as u64
}

/// Where upsets can land in one model: per node, a weight (MACs, plus the output
/// elements so non-MAC nodes get a small share) and the output size.
#[derive(Debug, Clone)]
pub struct FaultSpace {
    cumulative: Vec<u64>,
    elements: Vec<usize>,
    bits: u8,
    pub total_macs: u64,
}

impl FaultSpace {
    pub fn new(node_macs: &[u64], node_elements: &[usize], bits: u8) -> FaultSpace {
        let mut acc = 0u64;
        let cumulative = node_macs
            .iter()
            .zip(node_elements)
            .map(|(&m, &e)| {
                acc += if e == 0 { 0 } else { m + e as u64 };
                acc
            })
            .collect();
        FaultSpace {
            cumulative,
            elements: node_elements.to_vec(),
            bits,
            total_macs: node_macs.iter().sum(),
        }
    }

    /// The upsets of inference number `counter`, given the expected count `lambda`.
    pub fn draw(&self, seed: u64, counter: u64, lambda: f64, max: usize) -> Vec<Upset> {
        let total = self.cumulative.last().copied().unwrap_or(0);
        if lambda <= 0.0 || total == 0 || self.bits == 0 {
            return Vec::new();
        }
        let mut r = rng_for(seed, TAG_FAULTS, counter);
        let n = (poisson(&mut r, lambda) as usize).min(max);
        (0..n)
            .map(|_| {
                let x = r.random_range(0..total);
                let node = self.cumulative.partition_point(|&c| c <= x);
                let element = r.random_range(0..self.elements[node]);
                let bit = r.random_range(0..self.bits);
                Upset { node, element, bit }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_ordered_and_seeded() {
        let p = SimSection::default();
        for seed in 0..200 {
            let t = Thresholds::for_board(&p, seed);
            assert!(t.vmin_mv > t.vhang_mv && t.vhang_mv > t.vcrash_mv, "{t:?}");
            assert!((t.vmin_mv - 570.0).abs() <= 10.0);
            assert_eq!(t, Thresholds::for_board(&p, seed));
        }
        assert_ne!(Thresholds::for_board(&p, 1), Thresholds::for_board(&p, 2));
    }

    #[test]
    fn rate_zero_above_vmin_and_monotone_below() {
        let p = SimSection::default();
        let th = Thresholds {
            vmin_mv: 570.0,
            vhang_mv: 540.0,
            vcrash_mv: 530.0,
        };
        assert_eq!(upset_rate(&p, &th, 850.0, 90.0, 1 << 30), 0.0);
        assert_eq!(upset_rate(&p, &th, 570.0, 50.0, 1 << 30), 0.0);
        let a = upset_rate(&p, &th, 565.0, 50.0, 15_000_000);
        let b = upset_rate(&p, &th, 550.0, 50.0, 15_000_000);
        let c = upset_rate(&p, &th, 550.0, 70.0, 15_000_000);
        assert!(0.0 < a && a < b && b < c, "{a} {b} {c}");
    }

    #[test]
    fn draws_are_deterministic_and_in_range() {
        let fs = FaultSpace::new(&[100, 0, 5000], &[10, 4, 20], 8);
        let a = fs.draw(7, 3, 20.0, 1000);
        assert_eq!(a, fs.draw(7, 3, 20.0, 1000));
        assert_ne!(a, fs.draw(7, 4, 20.0, 1000));
        assert!(!a.is_empty());
        for u in &a {
            assert!(u.element < [10, 4, 20][u.node] && u.bit < 8);
        }
        assert!(fs.draw(7, 3, 0.0, 1000).is_empty());
        assert!(fs.draw(7, 3, 1e9, 5).len() <= 5);
    }
}
