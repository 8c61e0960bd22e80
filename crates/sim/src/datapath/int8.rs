//! int8 kernels: int32 accumulation of `w·(x − zp_in)` (wrapping, as the accelerator's
//! adders), then requantisation. Wrapping addition is associative, so accumulators
//! may be updated by deltas in any order and still equal a full recomputation bit for
//! bit; the fault engine relies on that.
//!
//! Products fit i16: |w| ≤ 128 and |x − zp_in| ≤ 255 give |w·(x − zp_in)| ≤ 32640, so
//! the dense loops multiply in i16 (SSE2 `pmullw`) and widen to i32 to accumulate.

use super::requant::Requant;

/// Copies `x − zp` (`[c,h,w]`) into `buf` as i16 `[c,h+2p,w+2p]`; borders hold 0,
/// i.e. the padding value `zp` contributes nothing.
pub fn pad_input(x: &[i8], zp: i32, c: usize, h: usize, w: usize, p: usize, buf: &mut Vec<i16>) {
    let (ph, pw) = (h + 2 * p, w + 2 * p);
    buf.clear();
    buf.resize(c * ph * pw, 0);
    let zp = zp as i16;
    for ci in 0..c {
        for y in 0..h {
            let src = &x[(ci * h + y) * w..][..w];
            let dst = &mut buf[(ci * ph + y + p) * pw + p..][..w];
            for (d, s) in dst.iter_mut().zip(src) {
                *d = *s as i16 - zp;
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub pad: usize,
}

/// Accumulators of output channels `chans`: `acc[o] = b[o] + Σ w·(x − zp)` (wrapping).
pub fn conv_acc(
    g: ConvGeom,
    xp: &[i16],
    wt: &[i16],
    b: &[i32],
    chans: impl Iterator<Item = usize>,
    acc: &mut [i32],
) {
    let (h, w, k) = (g.h, g.w, g.k);
    let (ph, pw) = (h + 2 * g.pad, w + 2 * g.pad);
    let hw = h * w;
    for o in chans {
        let a = &mut acc[o * hw..][..hw];
        a.fill(b[o]);
        for c in 0..g.cin {
            let plane = &xp[c * ph * pw..][..ph * pw];
            let wo = &wt[(o * g.cin + c) * k * k..][..k * k];
            for ky in 0..k {
                // Three taps of one kernel row at once: one pass over the accumulator.
                if k == 3 {
                    let (w0, w1, w2) = (wo[ky * 3], wo[ky * 3 + 1], wo[ky * 3 + 2]);
                    if w0 == 0 && w1 == 0 && w2 == 0 {
                        continue;
                    }
                    for y in 0..h {
                        let src = &plane[(y + ky) * pw..][..w + 2];
                        let dst = &mut a[y * w..][..w];
                        for (x, d) in dst.iter_mut().enumerate() {
                            let s = w0.wrapping_mul(src[x]) as i32
                                + w1.wrapping_mul(src[x + 1]) as i32
                                + w2.wrapping_mul(src[x + 2]) as i32;
                            *d = d.wrapping_add(s);
                        }
                    }
                } else {
                    for kx in 0..k {
                        let wv = wo[ky * k + kx];
                        if wv == 0 {
                            continue;
                        }
                        for y in 0..h {
                            let src = &plane[(y + ky) * pw + kx..][..w];
                            let dst = &mut a[y * w..][..w];
                            for (d, s) in dst.iter_mut().zip(src) {
                                *d = d.wrapping_add(wv.wrapping_mul(*s) as i32);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Transposed 2x2 stride-2 conv accumulators of channels `chans` (input `[cin,h,w]`,
/// `xs` = `x − zp_in` as i16, weights `[cin,cout,2,2]`).
#[allow(clippy::too_many_arguments)]
pub fn convt_acc(
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    xs: &[i16],
    wt: &[i16],
    b: &[i32],
    chans: impl Iterator<Item = usize>,
    acc: &mut [i32],
) {
    let (oh, ow) = (2 * h, 2 * w);
    for o in chans {
        let plane = &mut acc[o * oh * ow..][..oh * ow];
        plane.fill(b[o]);
        for c in 0..cin {
            let src = &xs[c * h * w..][..h * w];
            let wc = &wt[(c * cout + o) * 4..][..4];
            for i in 0..h {
                let srow = &src[i * w..][..w];
                for di in 0..2 {
                    let drow = &mut plane[(2 * i + di) * ow..][..ow];
                    let (w0, w1) = (wc[di * 2], wc[di * 2 + 1]);
                    for (j, s) in srow.iter().enumerate() {
                        drow[2 * j] = drow[2 * j].wrapping_add(w0.wrapping_mul(*s) as i32);
                        drow[2 * j + 1] = drow[2 * j + 1].wrapping_add(w1.wrapping_mul(*s) as i32);
                    }
                }
            }
        }
    }
}

/// Requantises `acc` of channel `o` into `out` (same length).
#[inline]
pub fn requant_plane(acc: &[i32], rq: Requant, zp: i32, lo: i32, hi: i32, out: &mut [i8]) {
    for (d, &a) in out.iter_mut().zip(acc) {
        *d = rq.to_i8(a, zp, lo, hi);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_acc_matches_naive_including_padding() {
        let g = ConvGeom {
            cin: 3,
            cout: 2,
            h: 4,
            w: 5,
            k: 3,
            pad: 1,
        };
        let x: Vec<i8> = (0..60).map(|i| ((i * 37) % 256) as u8 as i8).collect();
        let wt: Vec<i16> = (0..54)
            .map(|i| ((i * 91) % 256) as u8 as i8 as i16)
            .collect();
        let b = [i32::MAX - 5, -7];
        let zp = -17;
        let mut xp = Vec::new();
        pad_input(&x, zp, 3, 4, 5, 1, &mut xp);
        let mut acc = vec![0; 40];
        conv_acc(g, &xp, &wt, &b, 0..2, &mut acc);
        for o in 0..2 {
            for y in 0..4usize {
                for xx in 0..5usize {
                    let mut a = b[o];
                    for c in 0..3 {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) =
                                    (y as i64 + ky as i64 - 1, xx as i64 + kx as i64 - 1);
                                let v = if (0..4).contains(&iy) && (0..5).contains(&ix) {
                                    x[(c * 4 + iy as usize) * 5 + ix as usize] as i32 - zp
                                } else {
                                    0
                                };
                                a = a.wrapping_add(wt[((o * 3 + c) * 3 + ky) * 3 + kx] as i32 * v);
                            }
                        }
                    }
                    assert_eq!(acc[(o * 4 + y) * 5 + xx], a);
                }
            }
        }
    }
}
