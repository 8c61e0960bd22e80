//! One job's hardware side: the model in accelerator memory, the golden pass, and the
//! per-trial sequence voltage -> inject -> run inputs -> classify -> restore.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::manifest::{DType, Manifest};
use proto::model_files::{self, TestSet};
use proto::wire::{JobSpec, Outcome, Record, TrialSpec};

use crate::board::Board;
use crate::driver::{Hls, RunResult, calibrate_timeout};
use crate::inject::{InjectError, Injector, ParamsImage, Poke, blob_matches, write_blob};
use crate::safety::{self, VoltageError};
use crate::trial::classify::{classify, mean_iou};

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The job cannot run on this board (reported as `JobState::Failed`).
    #[error("{0}")]
    Failed(String),
    /// The board did not answer (crashed or powered off).
    #[error("board unreachable: {0}")]
    Unreachable(String),
}

pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Models on disk, in name order: a model's index is its id (the firmware preloads
/// model `id` at `params_region.base + id * model_slot_bytes`). Same rule as the board
/// image: every regular `*.json` file in the directory is a manifest.
pub fn list_models(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".json"))
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub struct InputData {
    pub index: u32,
    pub bytes: Vec<u8>,
    pub truth: Vec<u8>,
    pub golden: Vec<u8>,
    pub golden_iou_truth: f32,
}

pub struct Engine {
    pub job: JobSpec,
    pub manifest: Manifest,
    pub hls: Hls,
    pub inputs: Vec<InputData>,
    pub injector: Injector,
    pub timeout: Duration,
    pub p99: Duration,
    out_buf: Vec<u8>,
    input_region: String,
    output_region: String,
    model_id: u32,
    params_phys: u64,
}

/// What a trial produced.
pub struct TrialRun {
    pub records: Vec<Record>,
    /// Restore check failed: the board is no longer trustworthy.
    pub suspect: Option<String>,
    /// The board stopped answering during the trial.
    pub crashed: bool,
    /// The accelerator hung and did not return to idle: it needs a power cycle.
    pub wedged: bool,
}

pub struct Infer {
    pub result: RunResult,
    pub classes: Vec<u8>,
    pub nonfinite: u32,
    pub power_w: f32,
    pub start_ns: u64,
    pub end_ns: u64,
}

fn mmio_err(e: impl std::fmt::Display) -> PrepareError {
    PrepareError::Failed(format!("memory access: {e}"))
}

impl Engine {
    /// Load the model, check the accelerator and the parameters, run the golden pass.
    pub fn prepare(
        board: &mut Board,
        models_dir: &Path,
        job: &JobSpec,
    ) -> Result<Engine, PrepareError> {
        let f = &board.file;
        let regs = board
            .window(&f.accelerator.region)
            .ok_or_else(|| PrepareError::Failed("accelerator region not mapped".into()))?
            .clone();
        let hls = Hls::new(regs, f.accelerator.regs.clone(), f.accelerator.clock_hz);
        let id = hls.id().map_err(mmio_err)?;
        if id != f.accelerator.id {
            return Err(PrepareError::Failed(format!(
                "accelerator ID register reads {id:#010x}, the board file expects {:#010x}: refusing to drive it",
                f.accelerator.id
            )));
        }
        let models = list_models(models_dir);
        let model_id = models.iter().position(|m| *m == job.model).ok_or_else(|| {
            PrepareError::Failed(format!(
                "model {:?} is not in {} (have: {})",
                job.model,
                models_dir.display(),
                models.join(", ")
            ))
        })? as u32;
        let (manifest, blob) = model_files::load_model(models_dir, &job.model)
            .map_err(|e| PrepareError::Failed(e.to_string()))?;
        let params_phys = f.model_params_addr(model_id).ok_or_else(|| {
            PrepareError::Failed(format!(
                "model id {model_id} has no parameter slot on this board"
            ))
        })?;
        let preg = f
            .region(&f.accelerator.params_region)
            .expect("validated board file");
        if blob.len() as u64 > f.accelerator.model_slot_bytes {
            return Err(PrepareError::Failed(format!(
                "model {} has {} parameter bytes, the slot holds {}",
                job.model,
                blob.len(),
                f.accelerator.model_slot_bytes
            )));
        }
        let params_off = params_phys - preg.base;
        let pw = board.window(&preg.name).expect("mapped").clone();
        if !blob_matches(&pw, params_off, &blob).map_err(mmio_err)? {
            tracing::warn!(model = %job.model, "Preloaded parameters differ from the model file; rewriting them");
            write_blob(&pw, params_off, &blob).map_err(mmio_err)?;
        }
        let input_region = f.accelerator.input_region.clone();
        let output_region = f.accelerator.output_region.clone();
        let in_r = f.region(&input_region).expect("validated");
        let out_r = f.region(&output_region).expect("validated");
        let in_bytes = manifest.input.nbytes();
        let out_bytes = manifest.output.nbytes();
        if in_bytes as u64 > in_r.size
            || out_bytes as u64 > out_r.size
            || in_bytes % 4 != 0
            || out_bytes % 4 != 0
        {
            return Err(PrepareError::Failed(format!(
                "model tensors ({in_bytes} B in, {out_bytes} B out) do not fit the io regions"
            )));
        }
        let ts = TestSet::load_size(models_dir, &manifest.size)
            .map_err(|e| PrepareError::Failed(e.to_string()))?;
        if job.inputs.is_empty() {
            return Err(PrepareError::Failed("job has no inputs".into()));
        }
        let mut inputs = Vec::new();
        for &i in &job.inputs {
            if i as usize >= ts.n {
                return Err(PrepareError::Failed(format!(
                    "input {i} is outside the test set ({} images)",
                    ts.n
                )));
            }
            let x = ts.input(i as usize);
            let bytes: Vec<u8> = match (manifest.input.dtype, manifest.input.quant) {
                (DType::I8, Some(q)) => model_files::quantize_input(x, q)
                    .into_iter()
                    .map(|v| v as u8)
                    .collect(),
                (DType::F32, _) => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
                (d, q) => {
                    return Err(PrepareError::Failed(format!(
                        "unsupported input dtype {d:?} with quant {q:?}"
                    )));
                }
            };
            if bytes.len() != in_bytes {
                return Err(PrepareError::Failed(format!(
                    "input {i} has {} bytes, the model expects {in_bytes}",
                    bytes.len()
                )));
            }
            inputs.push(InputData {
                index: i,
                bytes,
                truth: ts.label(i as usize).to_vec(),
                golden: Vec::new(),
                golden_iou_truth: 0.0,
            });
        }
        drop(ts);
        let injector = Injector::new(
            f,
            ParamsImage {
                region: preg.name.clone(),
                offset: params_off,
                blob: Arc::new(blob),
            },
        );
        let in_phys = in_r.base;
        let out_phys = out_r.base;
        hls.configure(in_phys, out_phys, params_phys, model_id)
            .map_err(mmio_err)?;
        let mut e = Engine {
            job: job.clone(),
            manifest,
            hls,
            inputs,
            injector,
            timeout: Duration::from_secs(5),
            p99: Duration::ZERO,
            out_buf: vec![0u8; out_bytes],
            input_region,
            output_region,
            model_id,
            params_phys,
        };
        e.golden(board)?;
        Ok(e)
    }

    /// Golden pass: every input enough times for a p99 (>= 20 runs in all); all runs of
    /// an input must agree.
    fn golden(&mut self, board: &mut Board) -> Result<(), PrepareError> {
        let reps = 20usize.div_ceil(self.inputs.len()).max(1);
        let mut lat = Vec::new();
        for k in 0..self.inputs.len() {
            let mut first: Option<Vec<u8>> = None;
            for _ in 0..reps {
                let r = self.infer(board, k, &[]).map_err(mmio_err)?;
                match r.result {
                    RunResult::Done { error, .. } if error != 0 => {
                        return Err(PrepareError::Failed(format!(
                            "golden run of input {} ended with accelerator ERROR {error:#x}",
                            self.inputs[k].index
                        )));
                    }
                    RunResult::Done { latency, .. } => lat.push(latency),
                    RunResult::Hang { waited } => {
                        return Err(PrepareError::Failed(format!(
                            "golden run of input {} hung ({waited:?})",
                            self.inputs[k].index
                        )));
                    }
                }
                if r.nonfinite > 0 {
                    tracing::warn!(
                        input = self.inputs[k].index,
                        "Golden output has non-finite values"
                    );
                }
                match &first {
                    None => first = Some(r.classes),
                    Some(g) if *g != r.classes => {
                        return Err(PrepareError::Failed(format!(
                            "golden runs of input {} disagree: the board is not deterministic at this operating point",
                            self.inputs[k].index
                        )));
                    }
                    _ => {}
                }
            }
            let g = first.expect("reps >= 1");
            let inp = &mut self.inputs[k];
            inp.golden_iou_truth = mean_iou(&g, &inp.truth, self.manifest.num_classes, Some(0));
            inp.golden = g;
        }
        let (p99, t) = calibrate_timeout(&lat, self.job.timeout_factor);
        self.p99 = p99;
        self.timeout = t;
        Ok(())
    }

    /// Re-run every input fault-free; the first one that differs from the stored golden.
    pub fn golden_recheck(&mut self, board: &mut Board) -> Result<Option<String>, PrepareError> {
        for k in 0..self.inputs.len() {
            let r = self.infer(board, k, &[]).map_err(mmio_err)?;
            if let RunResult::Hang { .. } = r.result {
                return Ok(Some(format!(
                    "golden re-run of input {} hung",
                    self.inputs[k].index
                )));
            }
            if r.classes != self.inputs[k].golden {
                let n = r
                    .classes
                    .iter()
                    .zip(&self.inputs[k].golden)
                    .filter(|(a, b)| a != b)
                    .count();
                return Ok(Some(format!(
                    "golden re-run of input {} differs from the stored golden in {n} pixels",
                    self.inputs[k].index
                )));
            }
        }
        Ok(None)
    }

    /// Write input `k`, run, read the output.
    pub fn infer(
        &mut self,
        board: &mut Board,
        k: usize,
        pokes: &[Poke],
    ) -> Result<Infer, crate::hw::devmem::MmioError> {
        let iw = board.window(&self.input_region).expect("mapped").clone();
        iw.write_bytes(0, &self.inputs[k].bytes)?;
        if pokes.iter().any(|p| p.input_buffer) {
            // Only MMIO can fail here; the pokes were checked when applied.
            if let Err(InjectError::Mmio { source, .. }) = self.injector.reapply_input(board, pokes)
            {
                return Err(source);
            }
        }
        let (p0, _) = board.sensors.power();
        let start_ns = unix_ns();
        let result = self.hls.run(self.timeout)?;
        let end_ns = unix_ns();
        let (p1, _) = board.sensors.power();
        let mut classes = Vec::new();
        let mut nonfinite = 0;
        if let RunResult::Done { .. } = result {
            let ow = board.window(&self.output_region).expect("mapped").clone();
            ow.read_bytes(0, &mut self.out_buf)?;
            if self.manifest.output.dtype == DType::F32 {
                nonfinite = self
                    .out_buf
                    .chunks_exact(4)
                    .filter(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
                    .count() as u32;
            }
            classes =
                model_files::argmax_classes(&self.out_buf, &self.manifest).unwrap_or_default();
        }
        Ok(Infer {
            result,
            classes,
            nonfinite,
            power_w: (p0 + p1) / 2.0,
            start_ns,
            end_ns,
        })
    }

    fn blank(
        &self,
        spec: &TrialSpec,
        k: usize,
        outcome: Outcome,
        detail: Option<String>,
    ) -> Record {
        let now = unix_ns();
        Record {
            job_id: self.job.job_id,
            campaign_id: self.job.campaign_id,
            trial_id: spec.trial_id,
            attempt: spec.attempt,
            input: self.inputs[k].index,
            golden_iou_vs_truth: self.inputs[k].golden_iou_truth,
            start_unix_ns: now,
            end_unix_ns: now,
            detail: detail.map(|d| truncate(d, 512)),
            ..Record::unmeasured(outcome, String::new())
        }
    }

    /// One record per input, all with `outcome` (refusals, crashes, harness errors).
    pub fn uniform(&self, spec: &TrialSpec, outcome: Outcome, detail: &str) -> Vec<Record> {
        (0..self.inputs.len())
            .map(|k| self.blank(spec, k, outcome, Some(detail.to_string())))
            .collect()
    }

    /// Check everything the trial asks for before touching the hardware.
    pub fn check(&self, board: &Board, spec: &TrialSpec) -> Result<(), String> {
        for (rail, mv) in &spec.voltages {
            let r = board
                .file
                .rail(rail)
                .ok_or_else(|| format!("unknown rail {rail:?}"))?;
            safety::check_setpoint(r, *mv)?;
        }
        for f in &spec.faults {
            self.injector.resolve(&board.file, &self.manifest, f)?;
        }
        Ok(())
    }

    pub fn run_trial(&mut self, board: &mut Board, spec: &TrialSpec) -> TrialRun {
        let done = |records| TrialRun {
            records,
            suspect: None,
            crashed: false,
            wedged: false,
        };
        if let Err(why) = self.check(board, spec) {
            return done(self.uniform(spec, Outcome::Refused, &why));
        }
        let vccint = vccint_rail(&board.file);
        // Voltage first: faults land on a board already at its operating point.
        for (rail, mv) in &spec.voltages {
            let Some(h) = board.rails.iter_mut().find(|r| r.cfg.name == *rail) else {
                continue;
            };
            let res = safety::walk(h, Some(&mut board.sensors), *mv, true);
            match res {
                Ok(_) => {}
                Err(VoltageError::Refused(why)) => {
                    return done(self.uniform(spec, Outcome::Refused, &why));
                }
                Err(VoltageError::Regulator(e)) if e.is_unreachable() => {
                    return TrialRun {
                        records: self.uniform(
                            spec,
                            Outcome::Crash,
                            &format!(
                                "board stopped answering while setting {rail} to {mv} mV: {e}"
                            ),
                        ),
                        suspect: None,
                        crashed: true,
                        wedged: false,
                    };
                }
                Err(e) => return done(self.uniform(spec, Outcome::InfraError, &e.to_string())),
            }
        }
        let vcc = trial_vccint_mv(board, &vccint);
        let pokes = match self.injector.apply(board, &self.manifest, &spec.faults) {
            Ok(p) => p,
            Err(InjectError::Refused(why)) => {
                return done(self.uniform(spec, Outcome::Refused, &why));
            }
            Err(e) => return done(self.uniform(spec, Outcome::InfraError, &e.to_string())),
        };
        let mut records = Vec::with_capacity(self.inputs.len());
        let mut crashed = false;
        let mut wedged: Option<String> = None;
        for k in 0..self.inputs.len() {
            if let Some(w) = &wedged {
                records.push(self.blank(spec, k, Outcome::Hang, Some(w.clone())));
                continue;
            }
            let inf = match self.infer(board, k, &pokes) {
                Ok(i) => i,
                Err(e) => {
                    records.push(self.blank(spec, k, Outcome::InfraError, Some(e.to_string())));
                    continue;
                }
            };
            let temp = board.sensors.max_temp_c();
            let mut rec = self.blank(spec, k, Outcome::Masked, None);
            rec.start_unix_ns = inf.start_ns;
            rec.end_unix_ns = inf.end_ns;
            rec.power_w = inf.power_w;
            rec.vccint_mv = vcc;
            rec.temp_c = if temp.is_nan() { 0.0 } else { temp };
            match inf.result {
                RunResult::Hang { waited } => {
                    rec.outcome = Outcome::Hang;
                    rec.latency_ns = waited.as_nanos() as u64;
                    rec.detail = Some(format!(
                        "no ap_done within {:?} ({}x p99 {:?})",
                        self.timeout, self.job.timeout_factor, self.p99
                    ));
                    // A hung accelerator on a dead board is a crash.
                    if let Some(h) = board.rails.first_mut()
                        && let Err(e) = h.reg.read_mv()
                        && e.is_unreachable()
                    {
                        crashed = true;
                        records.push(rec);
                        break;
                    }
                    if !self.hls.wait_idle(self.timeout).unwrap_or(false) {
                        wedged = Some(
                            "accelerator still busy after an earlier hang in this trial".into(),
                        );
                    }
                }
                RunResult::Done { error, .. } if error != 0 => {
                    rec.outcome = Outcome::InfraError;
                    rec.detail = Some(format!(
                        "accelerator ERROR register {error:#x} after the run"
                    ));
                }
                RunResult::Done {
                    latency, cycles, ..
                } => {
                    let inp = &self.inputs[k];
                    let v = classify(
                        &inf.classes,
                        &inp.golden,
                        &inp.truth,
                        inp.golden_iou_truth,
                        inf.nonfinite,
                        self.manifest.num_classes,
                        self.job.critical_iou,
                    );
                    rec.outcome = v.outcome;
                    rec.mismatched_pixels = v.mismatched;
                    rec.nonfinite = inf.nonfinite;
                    rec.iou_vs_golden = v.iou_vs_golden;
                    rec.iou_vs_truth = v.iou_vs_truth;
                    rec.latency_ns = latency.as_nanos() as u64;
                    rec.cycles = cycles;
                }
            }
            records.push(rec);
        }
        if crashed {
            let detail = "board stopped answering during the trial (hang, then no I2C response)";
            return TrialRun {
                records: self.uniform(spec, Outcome::Crash, detail),
                suspect: None,
                crashed: true,
                wedged: false,
            };
        }
        let suspect = match self.injector.restore(board, &pokes) {
            Ok(()) => match self.injector.verify(board, &pokes) {
                Ok(s) => s,
                Err(e) => Some(format!("restore check failed: {e}")),
            },
            Err(e) => Some(format!("restore failed: {e}")),
        };
        TrialRun {
            records,
            suspect: if wedged.is_some() { None } else { suspect },
            crashed: false,
            wedged: wedged.is_some(),
        }
    }

    pub fn model_id(&self) -> u32 {
        self.model_id
    }

    pub fn params_phys(&self) -> u64 {
        self.params_phys
    }
}

/// The core rail records report: the one on AMS in3 (VCCINT), else one named `vccint`,
/// else the first rail.
pub fn vccint_rail(file: &proto::board::BoardFile) -> String {
    file.rails
        .iter()
        .find(|r| r.ams_channel.as_deref() == Some("in3_input"))
        .or_else(|| file.rail("vccint"))
        .or_else(|| file.rails.first())
        .map(|r| r.name.clone())
        .unwrap_or_default()
}

/// VCCINT for this trial's records, read after its set-point was reached. The regulator
/// read-back comes first: AMS samples only a few times a second (slower when idle), so
/// right after a walk it can still show the previous voltage.
pub fn trial_vccint_mv(board: &mut Board, rail: &str) -> f32 {
    if let Some(mv) = board
        .rail_mut(rail)
        .and_then(|h| h.reg.read_mv().ok())
        .filter(|mv| mv.is_finite() && *mv > 0.0)
    {
        return mv;
    }
    board.sensors.rail_mv(rail, true).unwrap_or(0.0)
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut i = max;
        while !s.is_char_boundary(i) {
            i -= 1;
        }
        s.truncate(i);
    }
    s
}
