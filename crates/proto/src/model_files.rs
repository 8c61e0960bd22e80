//! Reading the shipped model files (`docs/models.md`): a manifest plus its safetensors
//! laid out into the accelerator-memory parameter blob, the test sets, input
//! quantisation and the class decision on output logits.

use crate::manifest::{DType, Manifest, ManifestError, Quant};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {message}")]
    SafeTensors { path: PathBuf, message: String },
    #[error("{path}: tensor {name:?} is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name:?}: {message}")]
    BadTensor {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error("output is {got} bytes, the manifest's output {shape:?} x {dtype:?} needs {want}")]
    OutputSize {
        got: usize,
        want: usize,
        shape: Vec<usize>,
        dtype: DType,
    },
    #[error("output shape {0:?} is not [classes, H, W]")]
    OutputShape(Vec<usize>),
}

fn st_dtype(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::I8 => StDtype::I8,
        DType::I32 => StDtype::I32,
        DType::U8 => StDtype::U8,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ModelFileError> {
    std::fs::read(path).map_err(|source| ModelFileError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>, ModelFileError> {
    SafeTensors::deserialize(bytes).map_err(|e| ModelFileError::SafeTensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Loads `{dir}/{name}.json` and `{dir}/{name}.safetensors` and lays every parameter
/// tensor out at its manifest offset in one `params_bytes` blob (gaps zero).
pub fn load_model(dir: &Path, name: &str) -> Result<(Manifest, Vec<u8>), ModelFileError> {
    let manifest = Manifest::load(&dir.join(format!("{name}.json")))?;
    let st_path = dir.join(format!("{name}.safetensors"));
    let bytes = read(&st_path)?;
    let params = layout_params(&manifest, &st_path, &bytes)?;
    Ok((manifest, params))
}

/// Lays the tensors of a safetensors file (`bytes`, read from `path`) out per `manifest`.
pub fn layout_params(
    manifest: &Manifest,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<u8>, ModelFileError> {
    let st = parse(path, bytes)?;
    let mut blob = vec![0u8; manifest.params_bytes];
    for t in &manifest.tensors {
        let view = st
            .tensor(&t.name)
            .map_err(|_| ModelFileError::MissingTensor {
                path: path.to_path_buf(),
                name: t.name.clone(),
            })?;
        let bad = |message: String| ModelFileError::BadTensor {
            path: path.to_path_buf(),
            name: t.name.clone(),
            message,
        };
        if view.dtype() != st_dtype(t.dtype) {
            return Err(bad(format!(
                "dtype {:?} in the file, manifest says {:?}",
                view.dtype(),
                t.dtype
            )));
        }
        if view.shape() != t.shape.as_slice() {
            return Err(bad(format!(
                "shape {:?} in the file, manifest says {:?}",
                view.shape(),
                t.shape
            )));
        }
        let data = view.data();
        // Manifest::validate checked offset + nbytes <= params_bytes.
        if data.len() != t.nbytes {
            return Err(bad(format!(
                "{} bytes in the file, manifest says {}",
                data.len(),
                t.nbytes
            )));
        }
        blob[t.offset..t.offset + t.nbytes].copy_from_slice(data);
    }
    Ok(blob)
}

/// A test set: `inputs` `[n, 25, h, w]` f32 and `labels` `[n, h, w]` classes 0..5.
#[derive(Debug, Clone, PartialEq)]
pub struct TestSet {
    pub inputs: Vec<f32>,
    pub labels: Vec<u8>,
    pub n: usize,
    pub bands: usize,
    pub h: usize,
    pub w: usize,
}

impl TestSet {
    pub fn load(path: &Path) -> Result<TestSet, ModelFileError> {
        let bytes = read(path)?;
        let st = parse(path, &bytes)?;
        let inputs = tensor_f32(path, &st, "inputs")?;
        let labels = tensor_raw(path, &st, "labels", StDtype::U8)?;
        let bad = |name: &str, message: String| ModelFileError::BadTensor {
            path: path.to_path_buf(),
            name: name.to_string(),
            message,
        };
        let &[n, bands, h, w] = inputs.0.as_slice() else {
            return Err(bad(
                "inputs",
                format!("shape {:?} is not [N,C,H,W]", inputs.0),
            ));
        };
        if labels.0 != [n, h, w] {
            return Err(bad(
                "labels",
                format!("shape {:?}, expected [{n}, {h}, {w}]", labels.0),
            ));
        }
        Ok(TestSet {
            inputs: inputs.1,
            labels: labels.1,
            n,
            bands,
            h,
            w,
        })
    }

    /// `{dir}/testset-{size}.safetensors`.
    pub fn load_size(dir: &Path, size: &str) -> Result<TestSet, ModelFileError> {
        Self::load(&dir.join(format!("testset-{size}.safetensors")))
    }

    /// Image `i` as `[bands, h, w]` (panics if `i >= n`, like slice indexing).
    pub fn input(&self, i: usize) -> &[f32] {
        let len = self.bands * self.h * self.w;
        &self.inputs[i * len..(i + 1) * len]
    }

    pub fn label(&self, i: usize) -> &[u8] {
        let len = self.h * self.w;
        &self.labels[i * len..(i + 1) * len]
    }
}

/// Shape and raw little-endian bytes of tensor `name`, which must have dtype `want`.
pub fn tensor_raw(
    path: &Path,
    st: &SafeTensors<'_>,
    name: &str,
    want: StDtype,
) -> Result<(Vec<usize>, Vec<u8>), ModelFileError> {
    let view = st.tensor(name).map_err(|_| ModelFileError::MissingTensor {
        path: path.to_path_buf(),
        name: name.to_string(),
    })?;
    if view.dtype() != want {
        return Err(ModelFileError::BadTensor {
            path: path.to_path_buf(),
            name: name.to_string(),
            message: format!("dtype {:?}, expected {want:?}", view.dtype()),
        });
    }
    Ok((view.shape().to_vec(), view.data().to_vec()))
}

/// Shape and values of f32 tensor `name`.
pub fn tensor_f32(
    path: &Path,
    st: &SafeTensors<'_>,
    name: &str,
) -> Result<(Vec<usize>, Vec<f32>), ModelFileError> {
    let (shape, raw) = tensor_raw(path, st, name, StDtype::F32)?;
    Ok((shape, f32s_from_le(&raw)))
}

/// Decodes little-endian f32s (a trailing partial element is ignored).
pub fn f32s_from_le(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// `q = clamp(round_half_away_from_zero(x / scale) + zero_point, -128, 127)`, in f32.
/// A NaN input maps to the zero point (the quantiser never sees one from a sensor).
pub fn quantize_input(x: &[f32], quant: Quant) -> Vec<i8> {
    let zp = quant.zero_point as f32;
    x.iter()
        .map(|&v| {
            let q = (v / quant.scale).round() + zp;
            if q.is_nan() {
                quant.zero_point.clamp(-128, 127) as i8
            } else {
                q.clamp(-128.0, 127.0) as i8
            }
        })
        .collect()
}

/// The class of each pixel of an output `[classes, H, W]` (f32 LE or i8 per the
/// manifest's output dtype): argmax over classes, lowest index winning ties, a NaN
/// greater than any number (first NaN wins), as `numpy.argmax`.
pub fn argmax_classes(output: &[u8], manifest: &Manifest) -> Result<Vec<u8>, ModelFileError> {
    let spec = &manifest.output;
    let want = spec.nbytes();
    if output.len() != want {
        return Err(ModelFileError::OutputSize {
            got: output.len(),
            want,
            shape: spec.shape.clone(),
            dtype: spec.dtype,
        });
    }
    let &[c, h, w] = spec.shape.as_slice() else {
        return Err(ModelFileError::OutputShape(spec.shape.clone()));
    };
    if c == 0 || c > 256 {
        return Err(ModelFileError::OutputShape(spec.shape.clone()));
    }
    let hw = h * w;
    let mut classes = vec![0u8; hw];
    match spec.dtype {
        DType::F32 => {
            let v = f32s_from_le(output);
            for (p, out) in classes.iter_mut().enumerate() {
                let mut best = v[p];
                let mut arg = 0;
                for k in 1..c {
                    if best.is_nan() {
                        break;
                    }
                    let x = v[k * hw + p];
                    if x.is_nan() || x > best {
                        best = x;
                        arg = k;
                    }
                }
                *out = arg as u8;
            }
        }
        DType::I8 | DType::U8 | DType::I32 => {
            let get = |i: usize| -> i64 {
                match spec.dtype {
                    DType::I8 => output[i] as i8 as i64,
                    DType::U8 => output[i] as i64,
                    _ => i32::from_le_bytes([
                        output[4 * i],
                        output[4 * i + 1],
                        output[4 * i + 2],
                        output[4 * i + 3],
                    ]) as i64,
                }
            };
            for (p, out) in classes.iter_mut().enumerate() {
                let mut best = get(p);
                let mut arg = 0;
                for k in 1..c {
                    let x = get(k * hw + p);
                    if x > best {
                        best = x;
                        arg = k;
                    }
                }
                *out = arg as u8;
            }
        }
    }
    Ok(classes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_rounds_half_away_and_saturates() {
        let q = Quant {
            scale: 0.5,
            zero_point: -4,
        };
        let x = [0.25, -0.25, 0.75, 1000.0, -1000.0, f32::NAN, 0.0];
        assert_eq!(quantize_input(&x, q), vec![-3, -5, -2, 127, -128, -4, -4]);
    }

    fn manifest_with_output(dtype: DType, shape: Vec<usize>) -> Manifest {
        let text = format!(
            r#"{{"format":"kv260-hil-model/1","name":"t","size":"tiny","activation":"relu","stage":"fp32",
            "num_classes":3,"input":{{"shape":[1,1,2],"dtype":"f32","quant":null}},
            "output":{{"node":"n","shape":{shape:?},"dtype":"{}","quant":null}},
            "params_bytes":0,"tensors":[],
            "nodes":[{{"name":"n","op":"relu","inputs":["input"],"out_shape":[1,1,2]}}]}}"#,
            match dtype {
                DType::F32 => "f32",
                _ => "i8",
            }
        );
        Manifest::from_json("t", &text).unwrap()
    }

    #[test]
    fn argmax_ties_and_nan() {
        let m = manifest_with_output(DType::F32, vec![3, 1, 2]);
        // pixel 0: logits 1, 1, 0 -> tie, lowest wins; pixel 1: 0, NaN, NaN -> first NaN.
        let v = [1.0f32, 0.0, 1.0, f32::NAN, 0.0, f32::NAN];
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(argmax_classes(&bytes, &m).unwrap(), vec![0, 1]);
        assert!(matches!(
            argmax_classes(&bytes[..8], &m),
            Err(ModelFileError::OutputSize { .. })
        ));
        let m = manifest_with_output(DType::I8, vec![3, 1, 2]);
        let bytes = [5u8, 0, 0x80, 7, 5, 7];
        assert_eq!(argmax_classes(&bytes, &m).unwrap(), vec![0, 1]);
    }

    #[test]
    fn bad_files_are_errors() {
        let dir = std::env::temp_dir().join(format!("model-files-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("x.safetensors"), b"garbage").unwrap();
        assert!(matches!(
            TestSet::load(&dir.join("x.safetensors")),
            Err(ModelFileError::SafeTensors { .. })
        ));
        assert!(matches!(
            load_model(&dir, "nope"),
            Err(ModelFileError::Manifest(_))
        ));
        std::fs::remove_dir_all(&dir).ok();
    }
}
