//! The datapath against the references shipped with the models (computed by the
//! independent Python peer: PyTorch for fp32, a NumPy integer reference for int8), and
//! the fault engine against full recomputation.

use proto::manifest::{DType, Manifest};
use proto::model_files::{TestSet, argmax_classes, f32s_from_le, quantize_input};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::SafeTensors;
use sim::datapath::{Engine, Model, Upset};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../board-images/models")
}

const ACTS: [&str; 3] = ["relu", "sigmoid", "hardsigmoid"];
const STAGES: [&str; 3] = ["fp32", "pruned", "int8"];

/// Every shipped model; the tiny set must be complete.
fn model_names() -> Vec<String> {
    let dir = models_dir();
    let mut out = Vec::new();
    for size in ["tiny", "small"] {
        for a in ACTS {
            for s in STAGES {
                let name = format!("{size}-{a}-{s}");
                if dir.join(format!("{name}.json")).exists() {
                    out.push(name);
                } else {
                    assert_ne!(size, "tiny", "model {name} is not in {}", dir.display());
                }
            }
        }
    }
    out
}

struct Refs {
    bytes: Vec<u8>,
    faults: Vec<serde_json::Value>,
}

impl Refs {
    fn load(name: &str) -> Refs {
        let dir = models_dir().join("refs");
        let bytes = std::fs::read(dir.join(format!("{name}.safetensors"))).expect("refs file");
        let faults: Vec<serde_json::Value> = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{name}.json"))).expect("refs json"),
        )
        .expect("refs json parses");
        Refs { bytes, faults }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("refs parse")
    }
    fn raw(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let st = self.st();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("refs tensor {name}"));
        (t.shape().to_vec(), t.data().to_vec())
    }
}

struct Loaded {
    #[allow(dead_code)]
    name: String,
    model: Arc<Model>,
    test: TestSet,
    refs: Refs,
}

fn load(name: &str) -> Loaded {
    let dir = models_dir();
    let model = Arc::new(Model::load(&dir, name).unwrap_or_else(|e| panic!("{name}: {e}")));
    let size = &model.manifest().size;
    let test = TestSet::load_size(&dir, size).expect("test set");
    Loaded {
        name: name.to_string(),
        refs: Refs::load(name),
        model,
        test,
    }
}

impl Loaded {
    fn int8(&self) -> bool {
        self.model.manifest().input.dtype == DType::I8
    }
    /// Image `i` in the accelerator's input layout.
    fn input(&self, i: usize) -> Vec<u8> {
        let x = self.test.input(i);
        match self.model.manifest().input.quant {
            Some(q) if self.int8() => quantize_input(x, q).iter().map(|&v| v as u8).collect(),
            _ => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// The contract's fp32 tolerance, NaN equal to NaN and infinities equal by sign.
fn fp32_close(a: f32, b: f32) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    if a.is_infinite() || b.is_infinite() {
        return a == b;
    }
    (a as f64 - b as f64).abs() <= 1e-4 * (b.abs() as f64).max(1.0)
}

#[test]
fn fault_free_outputs_match_the_references() {
    for name in model_names() {
        let l = load(&name);
        let m = l.model.manifest();
        let engine = Engine::new(l.model.clone());
        let (lshape, lbytes) = l.refs.raw("logits");
        let (cshape, classes) = l.refs.raw("classes");
        let nlog = lshape[0];
        let per = m.output.nbytes();
        let hw = l.test.h * l.test.w;
        assert_eq!(
            cshape,
            vec![l.test.n, l.test.h, l.test.w],
            "{name}: classes shape"
        );
        if l.int8() {
            let (qshape, q) = l.refs.raw("inputs_q");
            let nq = qshape[0];
            assert!(nq > 0, "{name}: inputs_q is empty");
            let qlen = q.len() / nq;
            for i in 0..nq {
                assert!(
                    l.input(i) == q[i * qlen..(i + 1) * qlen],
                    "{name}: quantised input {i} differs from inputs_q"
                );
            }
        }
        let mut near_ties = 0;
        for i in 0..l.test.n {
            let out = engine
                .run_full(l.model.pristine(), &l.input(i), &[])
                .expect("runs");
            let cls = argmax_classes(&out, m).expect("classes");
            let want_cls = &classes[i * hw..(i + 1) * hw];
            if l.int8() {
                if i < nlog {
                    assert!(
                        out == lbytes[i * per..(i + 1) * per],
                        "{name}: int8 logits of image {i} differ"
                    );
                }
                assert_eq!(cls, want_cls, "{name}: int8 classes of image {i}");
            } else if i < nlog {
                let got = f32s_from_le(&out);
                let want = f32s_from_le(&lbytes[i * per..(i + 1) * per]);
                for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        fp32_close(*a, *b),
                        "{name}: image {i} logit {k}: {a} vs ref {b}"
                    );
                }
                for p in 0..hw {
                    if cls[p] != want_cls[p] {
                        // Allowed only when the reference's top two are within 1e-4.
                        let mut v: Vec<f32> =
                            (0..m.num_classes).map(|c| want[c * hw + p]).collect();
                        v.sort_by(|a, b| b.total_cmp(a));
                        assert!(
                            v[0] - v[1] <= 1e-4 * v[0].abs().max(1.0),
                            "{name}: image {i} pixel {p}: class {} vs ref {}",
                            cls[p],
                            want_cls[p]
                        );
                        near_ties += 1;
                    }
                }
            }
        }
        eprintln!(
            "{name}: {} images, {nlog} with logits, {near_ties} near-tie pixels",
            l.test.n
        );
    }
}

fn flip(model: &Model, params: &mut [u8], tensor: &str, element: usize, bit: u32) {
    let t = model
        .manifest()
        .tensor(tensor)
        .unwrap_or_else(|| panic!("tensor {tensor}"));
    assert!(element < t.elements() && bit < t.dtype.bits());
    params[t.offset + element * t.dtype.size() + bit as usize / 8] ^= 1 << (bit % 8);
}

#[test]
fn fault_references_match() {
    let mut checked = 0;
    for name in model_names() {
        let l = load(&name);
        let mut engine = Engine::new(l.model.clone());
        for f in &l.refs.faults {
            let key = f["key"].as_str().expect("key");
            let tensor = f["tensor"].as_str().expect("tensor");
            let element = f["element"].as_u64().expect("element") as usize;
            let bit = f["bit"].as_u64().expect("bit") as u32;
            let img = f["input"].as_u64().expect("input") as usize;
            let mut params = l.model.pristine().to_vec();
            flip(&l.model, &mut params, tensor, element, bit);
            let input = l.input(img);
            let full = engine.run_full(&params, &input, &[]).expect("runs");
            let fast = engine.run(&params, &input, &[]).expect("runs");
            assert!(full == fast, "{name} {key}: run differs from run_full");
            let (_, want) = l.refs.raw(&format!("{key}.logits"));
            if l.int8() {
                assert!(
                    full == want,
                    "{name} {key} ({tensor}[{element}] bit {bit}): logits differ from the reference"
                );
            } else {
                let (g, w) = (f32s_from_le(&full), f32s_from_le(&want));
                assert_eq!(g.len(), w.len());
                for (k, (a, b)) in g.iter().zip(&w).enumerate() {
                    assert!(
                        fp32_close(*a, *b),
                        "{name} {key} ({tensor}[{element}] bit {bit}): logit {k}: {a} vs ref {b}"
                    );
                }
            }
            checked += 1;
        }
    }
    eprintln!("{checked} fault references checked");
    assert!(checked > 0, "no fault references shipped");
}

/// A uniformly random single bit of the parameter fault space (tensor elements' bits).
fn random_bit(model: &Model, rng: &mut ChaCha8Rng) -> (usize, u8) {
    let m: &Manifest = model.manifest();
    let total: u64 = m.tensors.iter().map(|t| t.nbytes as u64 * 8).sum();
    let mut k = rng.random_range(0..total);
    for t in &m.tensors {
        let bits = t.nbytes as u64 * 8;
        if k < bits {
            return (t.offset + (k / 8) as usize, (k % 8) as u8);
        }
        k -= bits;
    }
    unreachable!()
}

fn random_upset(model: &Model, rng: &mut ChaCha8Rng) -> Upset {
    let sizes = model.node_output_elements();
    let node = rng.random_range(0..sizes.len());
    let bits = if model.manifest().input.dtype == DType::I8 {
        8
    } else {
        32
    };
    Upset {
        node,
        element: rng.random_range(0..sizes[node]),
        bit: rng.random_range(0..bits),
    }
}

#[test]
fn reuse_equals_full_recomputation_on_random_faults() {
    let mut total = 0;
    for (mi, name) in model_names().iter().enumerate() {
        let l = load(name);
        let mut rng = ChaCha8Rng::seed_from_u64(0xfa17 + mi as u64);
        let mut engine = Engine::new(l.model.clone());
        let trials = if l.model.manifest().size == "tiny" {
            400
        } else {
            8
        };
        let inputs: Vec<Vec<u8>> = (0..3.min(l.test.n)).map(|i| l.input(i)).collect();
        let golden: Vec<Vec<u8>> = inputs
            .iter()
            .map(|x| engine.run_full(l.model.pristine(), x, &[]).expect("runs"))
            .collect();
        let mut differ = 0;
        for t in 0..trials {
            let mut params = l.model.pristine().to_vec();
            let nbits = match t % 10 {
                0..=6 => 1,
                7 => 2,
                8 => 0,
                _ => 5,
            };
            for _ in 0..nbits {
                let (byte, bit) = random_bit(&l.model, &mut rng);
                params[byte] ^= 1 << bit;
            }
            let upsets: Vec<Upset> = match t % 10 {
                8 => (0..3).map(|_| random_upset(&l.model, &mut rng)).collect(),
                9 => vec![random_upset(&l.model, &mut rng)],
                _ => Vec::new(),
            };
            let input = &inputs[t % inputs.len()];
            let full = engine.run_full(&params, input, &upsets).expect("runs");
            let fast = engine.run(&params, input, &upsets).expect("runs");
            assert!(
                full == fast,
                "{name} trial {t}: run differs from run_full (upsets {upsets:?})"
            );
            differ += usize::from(full != golden[t % inputs.len()]);
        }
        let s = engine.stats();
        eprintln!("{name}: {trials} trials, {differ} changed the output; {s:?}");
        total += trials;
    }
    eprintln!("{total} random trials");
}

#[test]
fn hostile_parameters_never_panic_and_agree() {
    for name in model_names().iter().filter(|n| n.starts_with("tiny")) {
        let l = load(name);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut engine = Engine::new(l.model.clone());
        let input = l.input(0);
        for k in 0..4 {
            let mut params = l.model.pristine().to_vec();
            match k {
                0 => rng.fill(&mut params[..]),
                1 => params.iter_mut().for_each(|b| *b = 0xff),
                2 => params.iter_mut().for_each(|b| *b = 0x7f),
                _ => params.iter_mut().step_by(3).for_each(|b| *b ^= 0x40),
            }
            let full = engine.run_full(&params, &input, &[]).expect("runs");
            let fast = engine.run(&params, &input, &[]).expect("runs");
            assert!(full == fast, "{name}: hostile blob {k}");
        }
        assert!(engine.run(&input, &input[..3], &[]).is_err());
        assert!(
            engine
                .run_full(l.model.pristine(), &input[1..], &[])
                .is_err()
        );
        let bad = Upset {
            node: usize::MAX,
            element: 0,
            bit: 0,
        };
        assert!(engine.run(l.model.pristine(), &input, &[bad]).is_err());
        let n = l.model.node_output_elements();
        let bad = Upset {
            node: 0,
            element: n[0],
            bit: 0,
        };
        assert!(engine.run_full(l.model.pristine(), &input, &[bad]).is_err());
    }
}

/// Exponent-MSB flips of fp32 weights change outputs far more often than mantissa
/// flips; int8 outputs stay finite whatever the fault.
#[test]
fn science_sanity() {
    for a in ACTS {
        let l = load(&format!("tiny-{a}-fp32"));
        let m = l.model.manifest();
        let mut engine = Engine::new(l.model.clone());
        let input = l.input(0);
        let golden = engine
            .run_full(l.model.pristine(), &input, &[])
            .expect("runs");
        let gcls = argmax_classes(&golden, m).expect("classes");
        let weights: Vec<_> = m
            .tensors
            .iter()
            .filter(|t| t.kind == proto::manifest::TensorKind::Weight)
            .collect();
        let total: usize = weights.iter().map(|t| t.elements()).sum();
        let mut rng = ChaCha8Rng::seed_from_u64(30);
        let (mut exp_changed, mut mant_changed, n) = (0, 0, 300);
        for _ in 0..n {
            let mut k = rng.random_range(0..total);
            let t = weights
                .iter()
                .find(|t| {
                    if k < t.elements() {
                        true
                    } else {
                        k -= t.elements();
                        false
                    }
                })
                .expect("in range");
            for (bit, count) in [
                (30u32, &mut exp_changed),
                (rng.random_range(0..23), &mut mant_changed),
            ] {
                let mut params = l.model.pristine().to_vec();
                flip(&l.model, &mut params, &t.name, k, bit);
                let out = engine.run(&params, &input, &[]).expect("runs");
                if argmax_classes(&out, m).expect("classes") != gcls {
                    *count += 1;
                }
            }
        }
        eprintln!(
            "tiny-{a}-fp32: class map changed by {exp_changed}/{n} bit-30 flips, {mant_changed}/{n} mantissa flips"
        );
        assert!(
            exp_changed >= 5 * mant_changed.max(1),
            "tiny-{a}-fp32: {exp_changed} vs {mant_changed}"
        );
        assert!(
            exp_changed * 4 >= n,
            "tiny-{a}-fp32: only {exp_changed}/{n} exponent flips visible"
        );

        let l = load(&format!("tiny-{a}-int8"));
        let m = l.model.manifest();
        let q = m.output.quant.expect("int8 output quant");
        let mut engine = Engine::new(l.model.clone());
        let input = l.input(0);
        for _ in 0..300 {
            let mut params = l.model.pristine().to_vec();
            let (byte, bit) = random_bit(&l.model, &mut rng);
            params[byte] ^= 1 << bit;
            let out = engine.run(&params, &input, &[]).expect("runs");
            assert_eq!(out.len(), m.output.elements());
            assert!(
                out.iter()
                    .all(|&b| ((b as i8 as i32 - q.zero_point) as f32 * q.scale).is_finite())
            );
        }
    }
}
