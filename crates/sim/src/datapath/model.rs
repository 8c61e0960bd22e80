//! A model resolved for execution: the manifest checked against what the datapath can
//! run, node inputs as indices, parameter tensors located, and the pristine parameter
//! blob decoded once.

use super::DatapathError;
use super::requant::Requant;
use proto::manifest::{DType, Manifest, Node, Op, TensorKind};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Int8,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Kind {
    Conv { k: usize, pad: usize },
    ConvT,
    BatchNorm { eps: f32 },
    Relu,
    Sigmoid,
    HardSigmoid,
    Lut,
    MaxPool,
    Concat,
}

/// Where a node finds its parameter tensors (indices into `manifest.tensors`).
#[derive(Clone, Debug, Default)]
pub(crate) struct Slots {
    pub weight: Option<usize>,
    pub bias: Option<usize>,
    pub multiplier: Option<usize>,
    pub shift: Option<usize>,
    pub gamma: Option<usize>,
    pub beta: Option<usize>,
    pub mean: Option<usize>,
    pub var: Option<usize>,
    pub table: Option<usize>,
}

impl Slots {
    pub fn all(&self) -> impl Iterator<Item = usize> + '_ {
        [
            self.weight,
            self.bias,
            self.multiplier,
            self.shift,
            self.gamma,
            self.beta,
            self.mean,
            self.var,
            self.table,
        ]
        .into_iter()
        .flatten()
    }
}

#[derive(Clone, Debug)]
/// A node; its inputs are value indices: 0 is the network input, node `i` makes `i + 1`.
pub(crate) struct RNode {
    pub kind: Kind,
    /// Value indices.
    pub inputs: Vec<usize>,
    /// `[c, h, w]` of each input.
    pub in_shapes: Vec<[usize; 3]>,
    pub out: [usize; 3],
    pub slots: Slots,
    /// int8: zero point of each input, of the output, and the output clamp.
    pub zp_in: Vec<i32>,
    pub zp_out: i32,
    pub act_min: i32,
    pub act_max: i32,
    /// int8 concat: per-input rescale to the output quantisation.
    pub rescale: Vec<Requant>,
    /// fp32 conv: input channels at which golden partial sums are kept (quarters of
    /// the input channels and the concat boundaries of its input).
    pub ckpts: Vec<usize>,
}

impl RNode {
    pub fn out_len(&self) -> usize {
        self.out.iter().product()
    }
}

/// A node's parameters decoded from a blob.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Params {
    None,
    ConvF32 {
        w: Vec<f32>,
        b: Vec<f32>,
    },
    ConvI8 {
        w: Vec<i16>,
        b: Vec<i32>,
        rq: Vec<Requant>,
    },
    /// `denom = sqrt(var + eps)` per channel.
    Bn {
        gamma: Vec<f32>,
        beta: Vec<f32>,
        mean: Vec<f32>,
        denom: Vec<f32>,
    },
    Lut(Box<[i8; 256]>),
}

/// Parsed manifest, resolved graph and pristine parameters.
#[derive(Debug)]
pub struct Model {
    pub(crate) manifest: Manifest,
    pub(crate) precision: Precision,
    pub(crate) nodes: Vec<RNode>,
    /// Value index of the network output.
    pub(crate) output: usize,
    pub(crate) input_shape: [usize; 3],
    pub(crate) pristine: Vec<u8>,
    pub(crate) pristine_params: Vec<Params>,
    /// int8 conv weights of the pristine blob transposed to `[cin][k][k][cout8]` (cout
    /// padded to a multiple of 8 with zeros), for the
    /// channel-last delta scatter (empty for other nodes).
    pub(crate) pristine_wt: Vec<Vec<i16>>,
    /// For each manifest tensor, the nodes that read it.
    pub(crate) tensor_users: Vec<Vec<usize>>,
}

fn shape3(s: &[usize], what: &str) -> Result<[usize; 3], String> {
    match s {
        &[c, h, w] => Ok([c, h, w]),
        _ => Err(format!("{what} shape {s:?} is not [C, H, W]")),
    }
}

fn check_zp(zp: i32, what: &str) -> Result<i32, String> {
    if (-128..=127).contains(&zp) {
        Ok(zp)
    } else {
        Err(format!("{what} zero point {zp} is outside the int8 range"))
    }
}

impl Model {
    /// Loads `{dir}/{name}.json` + `.safetensors` (see `proto::model_files`).
    pub fn load(dir: &Path, name: &str) -> Result<Model, DatapathError> {
        let (m, params) = proto::model_files::load_model(dir, name)?;
        Model::from_parts(m, params)
    }

    pub fn from_parts(manifest: Manifest, params: Vec<u8>) -> Result<Model, DatapathError> {
        manifest.validate().map_err(DatapathError::Manifest)?;
        if params.len() != manifest.params_bytes {
            return Err(DatapathError::ParamsSize {
                got: params.len(),
                want: manifest.params_bytes,
            });
        }
        let precision = match manifest.input.dtype {
            DType::F32 => Precision::Fp32,
            DType::I8 => Precision::Int8,
            d => {
                return Err(DatapathError::Manifest(format!(
                    "input dtype {d:?} is neither f32 nor i8"
                )));
            }
        };
        let (nodes, output, input_shape, tensor_users) =
            resolve(&manifest, precision).map_err(DatapathError::Manifest)?;
        let mut model = Model {
            manifest,
            precision,
            nodes,
            output,
            input_shape,
            pristine: Vec::new(),
            pristine_params: Vec::new(),
            pristine_wt: Vec::new(),
            tensor_users,
        };
        model.pristine_params = (0..model.nodes.len())
            .map(|i| model.decode(i, &params))
            .collect();
        model.pristine_wt = model
            .nodes
            .iter()
            .zip(&model.pristine_params)
            .map(|(n, p)| match (n.kind, p) {
                (Kind::Conv { k, .. }, Params::ConvI8 { w, .. }) => {
                    // Rows padded to a multiple of 8 channels: whole SIMD vectors.
                    let [co, ci] = [n.out[0], n.in_shapes[0][0]];
                    let co8 = co.div_ceil(8) * 8;
                    let mut t = vec![0i16; ci * k * k * co8];
                    for o in 0..co {
                        for c in 0..ci {
                            for kk in 0..k * k {
                                t[(c * k * k + kk) * co8 + o] = w[(o * ci + c) * k * k + kk];
                            }
                        }
                    }
                    t
                }
                _ => Vec::new(),
            })
            .collect();
        model.pristine = params;
        Ok(model)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn pristine(&self) -> &[u8] {
        &self.pristine
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn input_bytes(&self) -> usize {
        self.manifest.input.nbytes()
    }

    pub fn output_bytes(&self) -> usize {
        self.manifest.output.nbytes()
    }

    /// Node output sizes in elements, for addressing upsets.
    pub fn node_output_elements(&self) -> Vec<usize> {
        self.nodes.iter().map(RNode::out_len).collect()
    }

    /// Multiply-accumulates per node (element-wise nodes count one per output element,
    /// concat and max-pool count their output elements too), for the cycle model.
    pub fn node_macs(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|n| {
                let [co, h, w] = n.out;
                let out = (co * h * w) as u64;
                match n.kind {
                    Kind::Conv { k, .. } => out * (n.in_shapes[0][0] * k * k) as u64,
                    Kind::ConvT => out * n.in_shapes[0][0] as u64,
                    _ => out,
                }
            })
            .collect()
    }

    /// Decodes node `i`'s parameters from `blob` (already checked to be `params_bytes`).
    pub(crate) fn decode(&self, i: usize, blob: &[u8]) -> Params {
        let n = &self.nodes[i];
        let t = |s: Option<usize>| -> &[u8] {
            let ti = &self.manifest.tensors[s.expect("resolved slot")];
            &blob[ti.offset..ti.offset + ti.nbytes]
        };
        let f32s = |s| -> Vec<f32> {
            t(s).chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let i32s = |s| -> Vec<i32> {
            t(s).chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        match (n.kind, self.precision) {
            (Kind::Conv { .. } | Kind::ConvT, Precision::Fp32) => Params::ConvF32 {
                w: f32s(n.slots.weight),
                b: f32s(n.slots.bias),
            },
            (Kind::Conv { .. } | Kind::ConvT, Precision::Int8) => Params::ConvI8 {
                w: t(n.slots.weight).iter().map(|&b| b as i8 as i16).collect(),
                b: i32s(n.slots.bias),
                rq: i32s(n.slots.multiplier)
                    .into_iter()
                    .zip(i32s(n.slots.shift))
                    .map(|(m, s)| Requant::new(m, s))
                    .collect(),
            },
            (Kind::BatchNorm { eps }, _) => Params::Bn {
                gamma: f32s(n.slots.gamma),
                beta: f32s(n.slots.beta),
                mean: f32s(n.slots.mean),
                denom: f32s(n.slots.var)
                    .into_iter()
                    .map(|v| (v + eps).sqrt())
                    .collect(),
            },
            (Kind::Lut, _) => {
                let mut table = Box::new([0i8; 256]);
                for (d, &s) in table.iter_mut().zip(t(n.slots.table)) {
                    *d = s as i8;
                }
                Params::Lut(table)
            }
            _ => Params::None,
        }
    }
}

type Resolved = (Vec<RNode>, usize, [usize; 3], Vec<Vec<usize>>);

fn resolve(m: &Manifest, precision: Precision) -> Result<Resolved, String> {
    let int8 = precision == Precision::Int8;
    let input_shape = shape3(&m.input.shape, "input")?;
    let in_zp = if int8 {
        let q = m.input.quant.ok_or("int8 model without input quant")?;
        check_zp(q.zero_point, "input")?
    } else {
        0
    };
    // Per value: shape and zero point.
    let mut shapes: Vec<[usize; 3]> = vec![input_shape];
    let mut zps: Vec<i32> = vec![in_zp];
    let mut names: Vec<&str> = vec!["input"];
    let mut nodes = Vec::with_capacity(m.nodes.len());
    let mut tensor_users = vec![Vec::new(); m.tensors.len()];
    for (idx, n) in m.nodes.iter().enumerate() {
        let r = resolve_node(m, n, int8, &shapes, &zps, &names)
            .map_err(|e| format!("node {}: {e}", n.name))?;
        for t in r.slots.all() {
            tensor_users[t].push(idx);
        }
        shapes.push(r.out);
        zps.push(r.zp_out);
        names.push(&n.name);
        nodes.push(r);
    }
    let out_name = m.output.node.as_deref().ok_or("output.node is missing")?;
    let output = names
        .iter()
        .rposition(|&n| n == out_name)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("output node {out_name:?} is not a node"))?;
    if m.output.shape != shapes[output] {
        return Err(format!(
            "output shape {:?} but node {out_name} produces {:?}",
            m.output.shape, shapes[output]
        ));
    }
    let want = if int8 { DType::I8 } else { DType::F32 };
    if m.output.dtype != want {
        return Err(format!(
            "output dtype {:?}, expected {want:?}",
            m.output.dtype
        ));
    }
    Ok((nodes, output, input_shape, tensor_users))
}

fn resolve_node(
    m: &Manifest,
    n: &Node,
    int8: bool,
    shapes: &[[usize; 3]],
    zps: &[i32],
    names: &[&str],
) -> Result<RNode, String> {
    let inputs: Vec<usize> = n
        .inputs
        .iter()
        .map(|i| {
            names
                .iter()
                .rposition(|&s| s == i)
                .ok_or_else(|| format!("input {i:?} is not an earlier node"))
        })
        .collect::<Result<_, _>>()?;
    if inputs.is_empty() {
        return Err("no inputs".into());
    }
    let in_shapes: Vec<[usize; 3]> = inputs.iter().map(|&v| shapes[v]).collect();
    let out = shape3(&n.out_shape, "out_shape")?;
    if out.contains(&0) || in_shapes.iter().any(|s| s.contains(&0)) {
        return Err("empty tensor shape".into());
    }
    let kind = match n.op {
        Op::Conv2d => {
            let k = n.attrs.kernel.ok_or("conv2d without kernel")?;
            let pad = n.attrs.padding.unwrap_or(0);
            if k == 0 || k % 2 == 0 || 2 * pad != k - 1 {
                return Err(format!(
                    "kernel {k} with padding {pad} is not a stride-1 'same' conv"
                ));
            }
            Kind::Conv { k, pad }
        }
        Op::Convtranspose2 => Kind::ConvT,
        Op::Batchnorm => Kind::BatchNorm {
            eps: n.attrs.eps.unwrap_or(1e-5),
        },
        Op::Relu => Kind::Relu,
        Op::Sigmoid => Kind::Sigmoid,
        Op::Hardsigmoid => Kind::HardSigmoid,
        Op::Lut => Kind::Lut,
        Op::Maxpool2 => Kind::MaxPool,
        Op::Concat => Kind::Concat,
    };
    let fp32_only = matches!(
        kind,
        Kind::BatchNorm { .. } | Kind::Relu | Kind::Sigmoid | Kind::HardSigmoid
    );
    if int8 && fp32_only {
        return Err(format!("op {:?} in an int8 model", n.op));
    }
    if !int8 && kind == Kind::Lut {
        return Err("op lut in an fp32 model".into());
    }
    if kind != Kind::Concat && inputs.len() != 1 {
        return Err(format!("{:?} takes one input, got {}", n.op, inputs.len()));
    }
    let [ci, h, w] = in_shapes[0];
    let expect_out = match kind {
        Kind::Conv { .. } => [out[0], h, w],
        Kind::ConvT => [out[0], 2 * h, 2 * w],
        Kind::MaxPool => [ci, h / 2, w / 2],
        Kind::Concat => {
            for s in &in_shapes {
                if s[1..] != [h, w] {
                    return Err(format!("concat inputs {in_shapes:?} differ in H, W"));
                }
            }
            [in_shapes.iter().map(|s| s[0]).sum(), h, w]
        }
        _ => [ci, h, w],
    };
    if out != expect_out {
        return Err(format!(
            "out_shape {out:?}, but {:?} of {in_shapes:?} gives {expect_out:?}",
            n.op
        ));
    }

    // Parameters by tensor kind: the manifest's `params` roles, plus tensors whose
    // `layer` is this node.
    let mut slots = Slots::default();
    let mut cand: Vec<usize> = n
        .params
        .values()
        .filter_map(|t| m.tensors.iter().position(|x| &x.name == t))
        .collect();
    for (i, t) in m.tensors.iter().enumerate() {
        if t.layer == n.name && !cand.contains(&i) {
            cand.push(i);
        }
    }
    for i in cand {
        let t = &m.tensors[i];
        let slot = match t.kind {
            TensorKind::Weight => &mut slots.weight,
            TensorKind::Bias => &mut slots.bias,
            TensorKind::Multiplier => &mut slots.multiplier,
            TensorKind::Shift => &mut slots.shift,
            TensorKind::BnGamma => &mut slots.gamma,
            TensorKind::BnBeta => &mut slots.beta,
            TensorKind::BnMean => &mut slots.mean,
            TensorKind::BnVar => &mut slots.var,
            TensorKind::Lut => &mut slots.table,
        };
        if slot.is_some() {
            return Err(format!("two {} tensors", t.kind.as_str()));
        }
        *slot = Some(i);
    }
    let need =
        |s: Option<usize>, kind: &str, dtype: DType, shape: &[usize]| -> Result<(), String> {
            let t = &m.tensors[s.ok_or_else(|| format!("missing {kind} tensor"))?];
            if t.dtype != dtype || t.shape != shape {
                return Err(format!(
                    "{kind} tensor {} is {:?} {:?}, expected {dtype:?} {shape:?}",
                    t.name, t.dtype, t.shape
                ));
            }
            Ok(())
        };
    let co = out[0];
    let (wd, bd) = if int8 {
        (DType::I8, DType::I32)
    } else {
        (DType::F32, DType::F32)
    };
    match kind {
        Kind::Conv { .. } | Kind::ConvT => {
            let wshape = match kind {
                Kind::Conv { k, .. } => vec![co, ci, k, k],
                _ => vec![ci, co, 2, 2],
            };
            need(slots.weight, "weight", wd, &wshape)?;
            need(slots.bias, "bias", bd, &[co])?;
            if int8 {
                need(slots.multiplier, "multiplier", DType::I32, &[co])?;
                need(slots.shift, "shift", DType::I32, &[co])?;
            }
        }
        Kind::BatchNorm { .. } => {
            need(slots.gamma, "bn_gamma", DType::F32, &[ci])?;
            need(slots.beta, "bn_beta", DType::F32, &[ci])?;
            need(slots.mean, "bn_mean", DType::F32, &[ci])?;
            need(slots.var, "bn_var", DType::F32, &[ci])?;
        }
        Kind::Lut => need(slots.table, "lut", DType::I8, &[256])?,
        _ => {}
    }
    let zp_in: Vec<i32> = inputs.iter().map(|&v| zps[v]).collect();
    let (mut zp_out, mut act_min, mut act_max) = (0, -128, 127);
    let mut rescale = Vec::new();
    if int8 {
        zp_out = match (kind, n.out_quant) {
            // Max-pool keeps its input's quantisation.
            (Kind::MaxPool, _) => zp_in[0],
            (_, Some(q)) => check_zp(q.zero_point, "output")?,
            (_, None) => return Err("int8 node without out_quant".into()),
        };
        act_min = n.act_min.unwrap_or(-128);
        act_max = n.act_max.unwrap_or(127);
        if !(-128..=127).contains(&act_min) || !(act_min..=127).contains(&act_max) {
            return Err(format!(
                "activation range [{act_min}, {act_max}] is not within int8"
            ));
        }
        if kind == Kind::Concat {
            if n.attrs.rescale.len() != inputs.len() {
                return Err(format!(
                    "{} rescale entries for {} inputs",
                    n.attrs.rescale.len(),
                    inputs.len()
                ));
            }
            rescale = n
                .attrs
                .rescale
                .iter()
                .map(|r| Requant::new(r.multiplier, r.shift))
                .collect();
        }
    }
    let mut ckpts = Vec::new();
    if let (Kind::Conv { .. }, false) = (kind, int8) {
        let step = ci.div_ceil(4);
        ckpts.extend((1..4).map(|q| q * step));
        if let Some(src) = inputs[0].checked_sub(1).map(|j| &m.nodes[j])
            && src.op == Op::Concat
        {
            let mut off = 0;
            for name in &src.inputs {
                if let Some(v) = names.iter().rposition(|s| s == name) {
                    off += shapes[v][0];
                    ckpts.push(off);
                }
            }
        }
        ckpts.retain(|&c| c > 0 && c < ci);
        ckpts.sort_unstable();
        ckpts.dedup();
    }
    Ok(RNode {
        ckpts,
        kind,
        inputs,
        in_shapes,
        out,
        slots,
        zp_in,
        zp_out,
        act_min,
        act_max,
        rescale,
    })
}
