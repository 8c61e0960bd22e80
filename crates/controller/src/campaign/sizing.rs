//! Statistical sizing (Leveugle et al., DATE 2009) and the Wilson score interval used
//! both for early stopping and in reports.

/// Injections needed for a population of `n_pop` possible faults at error margin `e`,
/// cut-off `t` (1.96 = 95 %) and expected failure probability `p`:
/// n = N / (1 + e^2 (N-1) / (t^2 p (1-p))), rounded up, never more than N.
pub fn leveugle(n_pop: u64, e: f64, t: f64, p: f64) -> u64 {
    if n_pop == 0 {
        return 0;
    }
    let n = n_pop as f64;
    let x = n / (1.0 + e * e * (n - 1.0) / (t * t * p * (1.0 - p)));
    // 1e-9 guards against 614.9999999 style float noise turning into an extra trial.
    let c = (x - 1e-9).ceil();
    (c as u64).clamp(1, n_pop)
}

/// Two-sided 95 % normal quantile (Phi^-1(0.975)).
pub const Z95: f64 = 1.959_963_984_540_053_6;

/// Wilson score interval for `k` failures in `n` trials: (low, high).
pub fn wilson(k: u64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n_f = n as f64;
    let p = k as f64 / n_f;
    let z2 = z * z;
    let denom = 1.0 + z2 / n_f;
    let center = (p + z2 / (2.0 * n_f)) / denom;
    let half = z / denom * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt();
    ((center - half).max(0.0), (center + half).min(1.0))
}

pub fn wilson_half_width(k: u64, n: u64) -> f64 {
    let (lo, hi) = wilson(k, n, Z95);
    (hi - lo) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leveugle_matches_the_paper() {
        assert_eq!(leveugle(u64::MAX / 4, 0.025, 1.96, 0.5), 1537);
        assert_eq!(leveugle(100_000_000, 0.025, 1.96, 0.5), 1537);
        assert_eq!(leveugle(1024, 0.025, 1.96, 0.5), 615);
        assert_eq!(leveugle(100_000_000, 0.05, 1.96, 0.5), 385);
        // The paper's first conv: 7,200 fp32 weights.
        assert_eq!(leveugle(230_400, 0.025, 1.96, 0.5), 1527);
        assert_eq!(leveugle(1, 0.025, 1.96, 0.5), 1);
        assert_eq!(leveugle(0, 0.025, 1.96, 0.5), 0);
    }

    #[test]
    fn wilson_matches_reference() {
        // Reference computed independently with python3's statistics module:
        //   from statistics import NormalDist; from math import sqrt
        //   z = NormalDist().inv_cdf(0.975); p = k/n; d = 1 + z*z/n
        //   c = (p + z*z/(2*n))/d; h = z/d*sqrt(p*(1-p)/n + z*z/(4*n*n)); print(c-h, c+h)
        #[allow(clippy::excessive_precision)]
        let cases: [(u64, u64, f64, f64); 4] = [
            (12, 615, 0.011196386353052964, 0.03379326071059186),
            (0, 1537, 0.0, 0.0024930915498822576),
            (500, 1000, 0.4690696003681042, 0.5309303996318958),
            (1537, 1537, 0.9975069084501176, 0.9999999999999998),
        ];
        for (k, n, lo, hi) in cases {
            let (l, h) = wilson(k, n, Z95);
            assert!((l - lo).abs() < 1e-9, "{k}/{n}: low {l} vs {lo}");
            assert!((h - hi).abs() < 1e-9, "{k}/{n}: high {h} vs {hi}");
        }
    }
}
