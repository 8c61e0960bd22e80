//! fp32 kernels. Every output element is accumulated in one fixed order (bias first,
//! then input channel, kernel row, kernel column ascending) whether it is computed by
//! the dense kernels or by the single-element gathers the fault engine uses, so both
//! give bit-identical results (Rust never contracts `a*b+c` into an FMA).
//! NaN and Inf propagate as in PyTorch: padding is a real zero that is multiplied
//! (`0·Inf = NaN`), and ReLU / max-pool are written without `f32::max`.

/// Copies `x` (`[c,h,w]`) into `buf` as `[c,h+2p,w+2p]` with zero borders.
pub fn pad_input(x: &[f32], c: usize, h: usize, w: usize, p: usize, buf: &mut Vec<f32>) {
    let (ph, pw) = (h + 2 * p, w + 2 * p);
    buf.clear();
    buf.resize(c * ph * pw, 0.0);
    for ci in 0..c {
        for y in 0..h {
            let src = &x[(ci * h + y) * w..][..w];
            buf[(ci * ph + y + p) * pw + p..][..w].copy_from_slice(src);
        }
    }
}

/// Shape and kernel of a stride-1 "same" convolution.
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub pad: usize,
}

/// Output channels `chans` of a conv: `out[o] = b[o] + Σ w·x`, `xp` padded by `pad_input`.
/// For each input-channel checkpoint `ckpts[j]` the partial sums over channels
/// `0..ckpts[j]` (bias included) are copied into `saves[j]` (same layout as `out`), so a
/// later recomputation can restart there when only channels `>= ckpts[j]` changed.
#[allow(clippy::too_many_arguments)]
pub fn conv_dense(
    g: ConvGeom,
    xp: &[f32],
    wt: &[f32],
    b: &[f32],
    chans: impl Iterator<Item = usize>,
    out: &mut [f32],
    ckpts: &[usize],
    saves: &mut [Vec<f32>],
) {
    let (h, w, k) = (g.h, g.w, g.k);
    let (ph, pw) = (h + 2 * g.pad, w + 2 * g.pad);
    let hw = h * w;
    for o in chans {
        let acc = &mut out[o * hw..][..hw];
        acc.fill(b[o]);
        let mut next = 0;
        for c in 0..g.cin {
            if next < ckpts.len() && ckpts[next] == c {
                if let Some(sv) = saves.get_mut(next) {
                    sv[o * hw..][..hw].copy_from_slice(acc);
                }
                next += 1;
            }
            let plane = &xp[c * ph * pw..][..ph * pw];
            for ky in 0..k {
                for kx in 0..k {
                    let wv = wt[((o * g.cin + c) * k + ky) * k + kx];
                    for y in 0..h {
                        let src = &plane[(y + ky) * pw + kx..][..w];
                        let dst = &mut acc[y * w..][..w];
                        for (d, s) in dst.iter_mut().zip(src) {
                            *d += wv * *s;
                        }
                    }
                }
            }
        }
    }
}

/// Row `y` of output channel `o`, continuing from partial sums `row` (bias, or a
/// checkpoint covering channels `0..c_from`) over channels `c_from..cin`: the same
/// per-element order as `conv_dense`.
pub fn conv_row(
    g: ConvGeom,
    xp: &[f32],
    wt: &[f32],
    o: usize,
    c_from: usize,
    y: usize,
    row: &mut [f32],
) {
    let (h, w, k) = (g.h, g.w, g.k);
    let (ph, pw) = (h + 2 * g.pad, w + 2 * g.pad);
    for c in c_from..g.cin {
        let plane = &xp[c * ph * pw..][..ph * pw];
        for ky in 0..k {
            for kx in 0..k {
                let wv = wt[((o * g.cin + c) * k + ky) * k + kx];
                let src = &plane[(y + ky) * pw + kx..][..w];
                for (d, s) in row.iter_mut().zip(src) {
                    *d += wv * *s;
                }
            }
        }
    }
}

/// One conv output element, same order as `conv_dense`, reading the unpadded input.
pub fn conv_at(
    g: ConvGeom,
    x: &[f32],
    wt: &[f32],
    b: &[f32],
    o: usize,
    y: usize,
    xx: usize,
) -> f32 {
    let (h, w, k) = (g.h, g.w, g.k);
    let mut acc = b[o];
    for c in 0..g.cin {
        let wo = &wt[(o * g.cin + c) * k * k..][..k * k];
        for ky in 0..k {
            let iy = (y + ky).wrapping_sub(g.pad);
            for kx in 0..k {
                let ix = (xx + kx).wrapping_sub(g.pad);
                let v = if iy < h && ix < w {
                    x[(c * h + iy) * w + ix]
                } else {
                    0.0
                };
                acc += wo[ky * k + kx] * v;
            }
        }
    }
    acc
}

/// Transposed 2x2 stride-2 conv, output channels `chans`:
/// `y[o,2i+di,2j+dj] = b[o] + Σ_c x[c,i,j]·w[c,o,di,dj]` (input `[cin,h,w]`).
#[allow(clippy::too_many_arguments)]
pub fn convt_dense(
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    x: &[f32],
    wt: &[f32],
    b: &[f32],
    chans: impl Iterator<Item = usize>,
    out: &mut [f32],
) {
    let (oh, ow) = (2 * h, 2 * w);
    for o in chans {
        let plane = &mut out[o * oh * ow..][..oh * ow];
        plane.fill(b[o]);
        for c in 0..cin {
            let src = &x[c * h * w..][..h * w];
            let wc = &wt[(c * cout + o) * 4..][..4];
            for i in 0..h {
                let srow = &src[i * w..][..w];
                for di in 0..2 {
                    let drow = &mut plane[(2 * i + di) * ow..][..ow];
                    let (w0, w1) = (wc[di * 2], wc[di * 2 + 1]);
                    for (j, s) in srow.iter().enumerate() {
                        drow[2 * j] += *s * w0;
                        drow[2 * j + 1] += *s * w1;
                    }
                }
            }
        }
    }
}

/// One transposed-conv output element, same order as `convt_dense`.
#[allow(clippy::too_many_arguments)]
pub fn convt_at(
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    x: &[f32],
    wt: &[f32],
    b: &[f32],
    o: usize,
    oy: usize,
    ox: usize,
) -> f32 {
    let (i, di, j, dj) = (oy / 2, oy % 2, ox / 2, ox % 2);
    let mut acc = b[o];
    for c in 0..cin {
        acc += x[(c * h + i) * w + j] * wt[(c * cout + o) * 4 + di * 2 + dj];
    }
    acc
}

/// Batch-norm with the per-channel `sqrt(var + eps)` precomputed.
#[inline(always)]
pub fn bn(x: f32, mean: f32, denom: f32, gamma: f32, beta: f32) -> f32 {
    (x - mean) / denom * gamma + beta
}

/// `max(x, 0)`, NaN in gives NaN out.
#[inline(always)]
pub fn relu(x: f32) -> f32 {
    if x < 0.0 { 0.0 } else { x }
}

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline(always)]
pub fn hardsigmoid(x: f32) -> f32 {
    if x.is_nan() {
        x
    } else if x <= -3.0 {
        0.0
    } else if x >= 3.0 {
        1.0
    } else {
        x / 6.0 + 0.5
    }
}

/// Max of a 2x2 window: NaN if any of the four is NaN (the first NaN in reading order).
#[inline(always)]
pub fn max4(v: [f32; 4]) -> f32 {
    let mut m = v[0];
    for &x in &v[1..] {
        if m.is_nan() {
            return m;
        }
        if x.is_nan() || x > m {
            m = x;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_propagates_through_relu_and_pool() {
        assert!(relu(f32::NAN).is_nan());
        assert_eq!(relu(-2.0), 0.0);
        assert_eq!(relu(f32::INFINITY), f32::INFINITY);
        assert!(hardsigmoid(f32::NAN).is_nan());
        assert!(sigmoid(f32::NAN).is_nan());
        assert_eq!(sigmoid(f32::INFINITY), 1.0);
        assert_eq!(sigmoid(f32::NEG_INFINITY), 0.0);
        assert!(max4([1.0, f32::NAN, 3.0, 2.0]).is_nan());
        assert!(max4([1.0, 2.0, 3.0, f32::NAN]).is_nan());
        assert_eq!(max4([1.0, 5.0, 3.0, 2.0]), 5.0);
        assert_eq!(hardsigmoid(-3.0), 0.0);
        assert_eq!(hardsigmoid(0.0), 0.5);
    }

    #[test]
    fn dense_and_gather_agree_bitwise_with_inf_weight_at_border() {
        let g = ConvGeom {
            cin: 2,
            cout: 2,
            h: 3,
            w: 4,
            k: 3,
            pad: 1,
        };
        let x: Vec<f32> = (0..24).map(|i| i as f32 * 0.37 - 3.0).collect();
        let mut wt: Vec<f32> = (0..36).map(|i| (i as f32 * 0.11).sin()).collect();
        wt[0] = f32::INFINITY;
        let b = [0.25, -1.0];
        let mut xp = Vec::new();
        pad_input(&x, 2, 3, 4, 1, &mut xp);
        let mut out = vec![0.0; 24];
        let mut saves = vec![vec![0.0; 24]];
        conv_dense(g, &xp, &wt, &b, 0..2, &mut out, &[1], &mut saves);
        for o in 0..2 {
            for y in 0..3 {
                for xx in 0..4 {
                    let a = conv_at(g, &x, &wt, &b, o, y, xx);
                    assert_eq!(a.to_bits(), out[(o * 3 + y) * 4 + xx].to_bits());
                }
            }
        }
        // Top-left tap of channel 0 hits the zero border at (0, *): Inf·0 = NaN.
        assert!(out[0].is_nan());
        // Restarting from the checkpoint after input channel 0 gives the same bits.
        for o in 0..2 {
            for y in 0..3 {
                let mut row = saves[0][(o * 3 + y) * 4..][..4].to_vec();
                conv_row(g, &xp, &wt, o, 1, y, &mut row);
                for (a, b) in row.iter().zip(&out[(o * 3 + y) * 4..][..4]) {
                    assert_eq!(a.to_bits(), b.to_bits());
                }
            }
        }
    }
}
