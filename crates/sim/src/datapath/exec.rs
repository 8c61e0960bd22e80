//! Dense execution of one node, shared by the full recomputation, the golden pass and
//! the fault engine's fallback, so all three produce the same bits.

use super::fp32;
use super::int8;
use super::model::{Kind, Model, Params, Precision, RNode};
use super::{DatapathError, Upset};

/// One activation tensor `[C,H,W]`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Buf {
    F32(Vec<f32>),
    I8(Vec<i8>),
}

impl Buf {
    pub fn zeros(p: Precision, len: usize) -> Buf {
        match p {
            Precision::Fp32 => Buf::F32(vec![0.0; len]),
            Precision::Int8 => Buf::I8(vec![0; len]),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Buf::F32(v) => v.len(),
            Buf::I8(v) => v.len(),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Buf::F32(v) => v.len() * 4,
            Buf::I8(v) => v.len(),
        }
    }

    /// Output bytes: f32 LE with every NaN written as the canonical quiet NaN (which
    /// NaN payload survives a sum of two NaNs depends on operand order, which the
    /// compiler may swap; nothing downstream reads payloads), or raw i8.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Buf::F32(v) => v
                .iter()
                .flat_map(|x| if x.is_nan() { f32::NAN } else { *x }.to_le_bytes())
                .collect(),
            Buf::I8(v) => v.iter().map(|&x| x as u8).collect(),
        }
    }

    pub fn from_input(p: Precision, bytes: &[u8]) -> Buf {
        match p {
            Precision::Fp32 => Buf::F32(proto::model_files::f32s_from_le(bytes)),
            Precision::Int8 => Buf::I8(bytes.iter().map(|&b| b as i8).collect()),
        }
    }

    /// Flips one bit of element `e` (bit < 32 for f32, < 8 for i8; checked by the caller).
    pub fn flip(&mut self, e: usize, bit: u8) {
        match self {
            Buf::F32(v) => v[e] = f32::from_bits(v[e].to_bits() ^ (1u32 << bit)),
            Buf::I8(v) => v[e] ^= (1u8 << bit) as i8,
        }
    }

    /// Bitwise equality of element `e` with `other`'s.
    #[inline]
    pub fn same_at(&self, other: &Buf, e: usize) -> bool {
        match (self, other) {
            (Buf::F32(a), Buf::F32(b)) => a[e].to_bits() == b[e].to_bits(),
            (Buf::I8(a), Buf::I8(b)) => a[e] == b[e],
            _ => false,
        }
    }

    pub fn f32(&self) -> &[f32] {
        match self {
            Buf::F32(v) => v,
            Buf::I8(_) => &[],
        }
    }

    pub fn i8(&self) -> &[i8] {
        match self {
            Buf::I8(v) => v,
            Buf::F32(_) => &[],
        }
    }

    pub fn f32_mut(&mut self) -> &mut [f32] {
        match self {
            Buf::F32(v) => v,
            Buf::I8(_) => &mut [],
        }
    }

    pub fn i8_mut(&mut self) -> &mut [i8] {
        match self {
            Buf::I8(v) => v,
            Buf::F32(_) => &mut [],
        }
    }
}

/// Scratch buffers reused across nodes and runs.
#[derive(Default, Debug)]
pub(crate) struct Scratch {
    pub pad_f: Vec<f32>,
    pub pad_i: Vec<i16>,
    pub acc: Vec<i32>,
}

pub(crate) fn check_upsets(model: &Model, upsets: &[Upset]) -> Result<(), DatapathError> {
    let bits = match model.precision {
        Precision::Fp32 => 32,
        Precision::Int8 => 8,
    };
    for u in upsets {
        let bad = |reason: String| DatapathError::BadUpset { upset: *u, reason };
        let Some(n) = model.nodes.get(u.node) else {
            return Err(bad(format!("the model has {} nodes", model.nodes.len())));
        };
        if u.element >= n.out_len() {
            return Err(bad(format!("node output has {} elements", n.out_len())));
        }
        if u.bit >= bits {
            return Err(bad(format!("elements have {bits} bits")));
        }
    }
    Ok(())
}

pub(crate) fn check_sizes(model: &Model, params: &[u8], input: &[u8]) -> Result<(), DatapathError> {
    if params.len() != model.manifest.params_bytes {
        return Err(DatapathError::ParamsSize {
            got: params.len(),
            want: model.manifest.params_bytes,
        });
    }
    if input.len() != model.input_bytes() {
        return Err(DatapathError::InputSize {
            got: input.len(),
            want: model.input_bytes(),
        });
    }
    Ok(())
}

/// Computes node `n` densely into `out` (all channels) from `vals` (every value before
/// it). For int8 conv / transposed conv the accumulators are left in `s.acc`.
/// With `saves`, fp32 convs also keep their checkpoint partial sums there.
pub(crate) fn dense_node(
    n: &RNode,
    p: &Params,
    vals: &[Buf],
    out: &mut Buf,
    s: &mut Scratch,
    saves: Option<&mut Vec<Vec<f32>>>,
) {
    let [co, oh, ow] = n.out;
    let ohw = oh * ow;
    let x = &vals[n.inputs[0]];
    let [ci, h, w] = n.in_shapes[0];
    match (n.kind, p) {
        (Kind::Conv { k, pad }, Params::ConvF32 { w: wt, b }) => {
            fp32::pad_input(x.f32(), ci, h, w, pad, &mut s.pad_f);
            let g = fp32::ConvGeom {
                cin: ci,
                cout: co,
                h,
                w,
                k,
                pad,
            };
            match saves {
                Some(sv) => {
                    *sv = vec![vec![0.0; co * ohw]; n.ckpts.len()];
                    fp32::conv_dense(g, &s.pad_f, wt, b, 0..co, out.f32_mut(), &n.ckpts, sv);
                }
                None => fp32::conv_dense(g, &s.pad_f, wt, b, 0..co, out.f32_mut(), &[], &mut []),
            }
        }
        (Kind::ConvT, Params::ConvF32 { w: wt, b }) => {
            fp32::convt_dense(ci, co, h, w, x.f32(), wt, b, 0..co, out.f32_mut());
        }
        (Kind::Conv { k, pad }, Params::ConvI8 { w: wt, b, rq }) => {
            int8::pad_input(x.i8(), n.zp_in[0], ci, h, w, pad, &mut s.pad_i);
            let g = int8::ConvGeom {
                cin: ci,
                cout: co,
                h,
                w,
                k,
                pad,
            };
            s.acc.resize(co * ohw, 0);
            int8::conv_acc(g, &s.pad_i, wt, b, 0..co, &mut s.acc);
            requant_all(n, rq, &s.acc, out.i8_mut());
        }
        (Kind::ConvT, Params::ConvI8 { w: wt, b, rq }) => {
            int8::pad_input(x.i8(), n.zp_in[0], ci, h, w, 0, &mut s.pad_i);
            s.acc.resize(co * ohw, 0);
            int8::convt_acc(ci, co, h, w, &s.pad_i, wt, b, 0..co, &mut s.acc);
            requant_all(n, rq, &s.acc, out.i8_mut());
        }
        (
            Kind::BatchNorm { .. },
            Params::Bn {
                gamma,
                beta,
                mean,
                denom,
            },
        ) => {
            let (xv, o) = (x.f32(), out.f32_mut());
            for c in 0..co {
                let (m, d, g, bt) = (mean[c], denom[c], gamma[c], beta[c]);
                for (y, &v) in o[c * ohw..][..ohw].iter_mut().zip(&xv[c * ohw..][..ohw]) {
                    *y = fp32::bn(v, m, d, g, bt);
                }
            }
        }
        (Kind::Relu, _) => map_f32(x.f32(), out.f32_mut(), fp32::relu),
        (Kind::Sigmoid, _) => map_f32(x.f32(), out.f32_mut(), fp32::sigmoid),
        (Kind::HardSigmoid, _) => map_f32(x.f32(), out.f32_mut(), fp32::hardsigmoid),
        (Kind::Lut, Params::Lut(t)) => {
            for (y, &v) in out.i8_mut().iter_mut().zip(x.i8()) {
                *y = t[(v as i32 + 128) as usize];
            }
        }
        (Kind::MaxPool, _) => {
            for e in 0..co * ohw {
                maxpool_at(n, x, out, e);
            }
        }
        (Kind::Concat, _) => {
            let mut off = 0;
            for (k, &u) in n.inputs.iter().enumerate() {
                let len = vals[u].len();
                match (&vals[u], &mut *out) {
                    (Buf::F32(x), Buf::F32(o)) => o[off..off + len].copy_from_slice(x),
                    (Buf::I8(x), Buf::I8(o)) => {
                        let (r, zi, zo) = (n.rescale[k], n.zp_in[k], n.zp_out);
                        for (d, &v) in o[off..off + len].iter_mut().zip(x) {
                            *d = r.to_i8(v as i32 - zi, zo, -128, 127);
                        }
                    }
                    _ => {}
                }
                off += len;
            }
        }
        // `Model::decode` pairs kinds and params; other combinations cannot occur.
        _ => {}
    }
}

fn map_f32(x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32) {
    for (y, &v) in out.iter_mut().zip(x) {
        *y = f(v);
    }
}

fn requant_all(n: &RNode, rq: &[super::requant::Requant], acc: &[i32], out: &mut [i8]) {
    let ohw = n.out[1] * n.out[2];
    for (o, r) in rq.iter().enumerate() {
        int8::requant_plane(
            &acc[o * ohw..][..ohw],
            *r,
            n.zp_out,
            n.act_min,
            n.act_max,
            &mut out[o * ohw..][..ohw],
        );
    }
}

/// Max-pool output element `e` from input `x`.
#[inline]
pub(crate) fn maxpool_at(n: &RNode, x: &Buf, out: &mut Buf, e: usize) {
    let [_, oh, ow] = n.out;
    let [_, h, w] = n.in_shapes[0];
    let (c, r) = (e / (oh * ow), e % (oh * ow));
    let (y, xx) = (r / ow, r % ow);
    let base = (c * h + 2 * y) * w + 2 * xx;
    let idx = [base, base + 1, base + w, base + w + 1];
    match (x, out) {
        (Buf::F32(xv), Buf::F32(o)) => o[e] = fp32::max4(idx.map(|i| xv[i])),
        (Buf::I8(xv), Buf::I8(o)) => o[e] = idx.iter().map(|&i| xv[i]).max().unwrap_or(0),
        _ => {}
    }
}

/// Concat: element `e` of input number `k` (`x`) into output element `oe`.
#[inline]
pub(crate) fn concat_at(n: &RNode, k: usize, x: &Buf, e: usize, out: &mut Buf, oe: usize) {
    match (x, out) {
        (Buf::F32(xv), Buf::F32(o)) => o[oe] = xv[e],
        (Buf::I8(xv), Buf::I8(o)) => {
            o[oe] = n.rescale[k].to_i8(xv[e] as i32 - n.zp_in[k], n.zp_out, -128, 127);
        }
        _ => {}
    }
}

/// Where the golden pass keeps int8 accumulators and fp32 checkpoint partial sums.
pub(crate) type Keep<'a> = (&'a mut Vec<Vec<i32>>, &'a mut Vec<Vec<Vec<f32>>>);

/// Full recomputation of `model` from `params` (already size-checked).
pub(crate) fn run_dense(
    model: &Model,
    params: &[Params],
    input: Buf,
    upsets: &[Upset],
    mut keep: Option<Keep<'_>>,
) -> Vec<Buf> {
    let mut s = Scratch::default();
    let mut vals = Vec::with_capacity(model.nodes.len() + 1);
    vals.push(input);
    for (i, n) in model.nodes.iter().enumerate() {
        let mut out = Buf::zeros(model.precision, n.out_len());
        let mut saves = Vec::new();
        let sv = keep.is_some().then_some(&mut saves);
        dense_node(n, &params[i], &vals, &mut out, &mut s, sv);
        for u in upsets.iter().filter(|u| u.node == i) {
            out.flip(u.element, u.bit);
        }
        if let Some((accs, prefixes)) = keep.as_mut() {
            let is_acc = model.precision == Precision::Int8
                && matches!(n.kind, Kind::Conv { .. } | Kind::ConvT);
            accs.push(if is_acc { s.acc.clone() } else { Vec::new() });
            prefixes.push(saves);
        }
        vals.push(out);
    }
    vals
}
