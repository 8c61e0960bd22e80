//! The model manifest: graph, parameter tensors and their layout in accelerator memory.
//! The format is specified in `docs/models.md`; the Python tooling writes it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const FORMAT: &str = "kv260-hil-model/1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    I8,
    I32,
    U8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::I8 | DType::U8 => 1,
        }
    }
    /// Bits per element: the fault space of one element.
    pub fn bits(self) -> u32 {
        self.size() as u32 * 8
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quant {
    pub scale: f32,
    pub zero_point: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IoSpec {
    /// For the output: the node that produces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub quant: Option<Quant>,
}

impl IoSpec {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        self.elements() * self.dtype.size()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorKind {
    Weight,
    Bias,
    BnGamma,
    BnBeta,
    BnMean,
    BnVar,
    Multiplier,
    Shift,
    Lut,
}

impl TensorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TensorKind::Weight => "weight",
            TensorKind::Bias => "bias",
            TensorKind::BnGamma => "bn_gamma",
            TensorKind::BnBeta => "bn_beta",
            TensorKind::BnMean => "bn_mean",
            TensorKind::BnVar => "bn_var",
            TensorKind::Multiplier => "multiplier",
            TensorKind::Shift => "shift",
            TensorKind::Lut => "lut",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorInfo {
    pub name: String,
    pub layer: String,
    pub kind: TensorKind,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte offset inside the parameter blob.
    pub offset: usize,
    pub nbytes: usize,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Conv2d,
    Batchnorm,
    Relu,
    Sigmoid,
    Hardsigmoid,
    Lut,
    Maxpool2,
    Convtranspose2,
    Concat,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rescale {
    pub multiplier: i32,
    pub shift: i32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Attrs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padding: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eps: Option<f32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rescale: Vec<Rescale>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<String>,
    pub out_shape: Vec<usize>,
    #[serde(default)]
    pub attrs: Attrs,
    /// Role (weight, bias, multiplier, shift, gamma, beta, mean, var, table) -> tensor name.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    #[serde(default)]
    pub out_quant: Option<Quant>,
    #[serde(default)]
    pub act_min: Option<i32>,
    #[serde(default)]
    pub act_max: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub name: String,
    pub size: String,
    pub activation: String,
    pub stage: String,
    pub num_classes: usize,
    pub input: IoSpec,
    pub output: IoSpec,
    pub params_bytes: usize,
    pub tensors: Vec<TensorInfo>,
    pub nodes: Vec<Node>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: malformed manifest: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Manifest {
    pub fn from_json(path: &str, text: &str) -> Result<Manifest, ManifestError> {
        let m: Manifest = serde_json::from_str(text).map_err(|source| ManifestError::Json {
            path: path.to_string(),
            source,
        })?;
        m.validate().map_err(|message| ManifestError::Invalid {
            path: path.to_string(),
            message,
        })?;
        Ok(m)
    }

    pub fn load(path: &std::path::Path) -> Result<Manifest, ManifestError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Io {
            path: p.clone(),
            source,
        })?;
        Self::from_json(&p, &text)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Layers that own at least one parameter tensor, in graph order.
    pub fn param_layers(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for n in &self.nodes {
            if self.tensors.iter().any(|t| t.layer == n.name) {
                out.push(&n.name);
            }
        }
        out
    }

    /// Structural checks: offsets in range and non-overlapping, sizes consistent,
    /// every node input and parameter resolvable.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format is {:?}, expected {FORMAT:?}", self.format));
        }
        let mut spans: Vec<(usize, usize, &str)> = Vec::new();
        for t in &self.tensors {
            let want = t.elements() * t.dtype.size();
            if t.nbytes != want {
                return Err(format!(
                    "tensor {}: nbytes {} but shape {:?} x {:?} is {want}",
                    t.name, t.nbytes, t.shape, t.dtype
                ));
            }
            let end = t.offset.checked_add(t.nbytes).ok_or("offset overflow")?;
            if end > self.params_bytes {
                return Err(format!(
                    "tensor {}: ends at byte {end}, past params_bytes {}",
                    t.name, self.params_bytes
                ));
            }
            spans.push((t.offset, end, &t.name));
        }
        spans.sort();
        for w in spans.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(format!("tensors {} and {} overlap", w[0].2, w[1].2));
            }
        }
        let mut seen: Vec<&str> = vec!["input"];
        for n in &self.nodes {
            for i in &n.inputs {
                if !seen.contains(&i.as_str()) {
                    return Err(format!(
                        "node {}: input {i:?} is not an earlier node",
                        n.name
                    ));
                }
            }
            for (role, t) in &n.params {
                if self.tensor(t).is_none() {
                    return Err(format!(
                        "node {}: {role} tensor {t:?} is not in tensors",
                        n.name
                    ));
                }
            }
            seen.push(&n.name);
        }
        match &self.output.node {
            Some(o) if seen.contains(&o.as_str()) => Ok(()),
            Some(o) => Err(format!("output node {o:?} is not a node")),
            None => Err("output.node is missing".into()),
        }
    }
}
