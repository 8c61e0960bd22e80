//! TFLite's integer requantisation (`MultiplyByQuantizedMultiplier`), exactly as
//! specified in `docs/models.md`. Multipliers and shifts come from accelerator memory
//! and may be hit by faults, so every input value is legal here.

/// Saturating rounding doubling high multiply.
#[inline(always)]
pub fn srdhm(a: i32, b: i32) -> i32 {
    if a == i32::MIN && b == i32::MIN {
        return i32::MAX;
    }
    let ab = a as i64 * b as i64;
    let nudge: i64 = if ab >= 0 { 1 << 30 } else { 1 - (1 << 30) };
    // |ab| < 2^62 here, so the quotient fits i32; `/` truncates toward zero.
    ((ab + nudge) / (1i64 << 31)) as i32
}

/// Rounding divide by a power of two, `e` in 0..=31.
#[inline(always)]
pub fn rdbpot(x: i32, e: u32) -> i32 {
    let mask: i64 = (1i64 << e) - 1;
    let x64 = x as i64;
    let rem = x64 & mask;
    let thr = (mask >> 1) + i64::from(x < 0);
    ((x64 >> e) + i64::from(rem > thr)) as i32
}

/// A multiplier/shift pair made safe to apply: the shift clamped to [-31, 30] once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requant {
    pub multiplier: i32,
    pub left: u32,
    pub right: u32,
}

impl Requant {
    #[inline(always)]
    pub fn new(multiplier: i32, shift: i32) -> Requant {
        let s = shift.clamp(-31, 30);
        Requant {
            multiplier,
            left: s.max(0) as u32,
            right: (-s).max(0) as u32,
        }
    }

    /// `MBQM(x, multiplier, shift)`.
    #[inline(always)]
    pub fn apply(self, x: i32) -> i32 {
        rdbpot(
            srdhm(x.wrapping_shl(self.left), self.multiplier),
            self.right,
        )
    }

    /// `clamp(zp + MBQM(x), lo, hi)` as an i8; `lo..=hi` lies within i8 range.
    #[inline(always)]
    pub fn to_i8(self, x: i32, zp: i32, lo: i32, hi: i32) -> i8 {
        (zp as i64 + self.apply(x) as i64).clamp(lo as i64, hi as i64) as i8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straight transcription of the pseudo-code in docs/models.md with i128, as an
    /// independent check of the i64 shortcuts above.
    fn mbqm_ref(x: i32, m: i32, shift: i32) -> i32 {
        let s = shift.clamp(-31, 30);
        let left = s.max(0);
        let right = (-s).max(0);
        let a = x.wrapping_shl(left as u32) as i128;
        let b = m as i128;
        let h = if a == i32::MIN as i128 && b == i32::MIN as i128 {
            i32::MAX as i128
        } else {
            let ab = a * b;
            let nudge = if ab >= 0 {
                1i128 << 30
            } else {
                1 - (1i128 << 30)
            };
            let q = (ab + nudge) / (1i128 << 31);
            q as i32 as i128
        };
        let mask = (1i128 << right) - 1;
        let rem = h & mask;
        let thr = (mask >> 1) + if h < 0 { 1 } else { 0 };
        ((h >> right) + if rem > thr { 1 } else { 0 }) as i32
    }

    #[test]
    fn known_values() {
        // 0.5 in Q31 times 10 is 5; SRDHM rounds 5.5 up to 6 and -5.5 to -5 (the nudge
        // is 1 - 2^30 for negatives and the division truncates).
        assert_eq!(Requant::new(1 << 30, 0).apply(10), 5);
        assert_eq!(Requant::new(1 << 30, 0).apply(11), 6);
        assert_eq!(Requant::new(1 << 30, 0).apply(-11), -5);
        assert_eq!(srdhm(i32::MIN, i32::MIN), i32::MAX);
        assert_eq!(rdbpot(-3, 1), -2); // -1.5 rounds away from zero
        assert_eq!(rdbpot(3, 1), 2);
        assert_eq!(rdbpot(i32::MIN, 31), -1);
        // Shifts beyond the range are clamped, not trusted.
        assert_eq!(Requant::new(1 << 30, i32::MAX), Requant::new(1 << 30, 30));
        assert_eq!(Requant::new(1 << 30, i32::MIN), Requant::new(1 << 30, -31));
    }

    #[test]
    fn matches_wide_reference_on_edge_and_random_values() {
        let edges = [
            0,
            1,
            -1,
            2,
            -2,
            127,
            -128,
            1 << 30,
            -(1 << 30),
            i32::MAX,
            i32::MIN,
            i32::MIN + 1,
        ];
        let shifts = [-40, -31, -30, -12, -1, 0, 1, 5, 30, 31, 100];
        let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as i32
        };
        for &x in &edges {
            for &m in &edges {
                for &sh in &shifts {
                    assert_eq!(
                        Requant::new(m, sh).apply(x),
                        mbqm_ref(x, m, sh),
                        "{x} {m} {sh}"
                    );
                }
            }
        }
        for _ in 0..200_000 {
            let (x, m, sh) = (next(), next(), next() % 40);
            assert_eq!(
                Requant::new(m, sh).apply(x),
                mbqm_ref(x, m, sh),
                "{x} {m} {sh}"
            );
        }
    }
}
