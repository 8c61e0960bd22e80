//! Datapath throughput: fault-free inferences/s, and trials/s of random single-bit
//! parameter faults with golden-activation reuse (`Engine::run`) vs full recomputation
//! (`Engine::run_full`), per shipped model.
//!
//! `cargo bench -p sim --bench datapath [-- [NAME_FILTER] [--trials N] [--rounds R]]`
//!
//! Times are on-CPU time of this thread (`/proc/thread-self/schedstat`, so other load on
//! the machine does not count), median over rounds that alternate reuse and full.

use proto::model_files::{TestSet, quantize_input};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sim::datapath::{Engine, Model};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Nanoseconds this thread has run on a CPU (wall clock if unavailable).
fn cpu_ns(start: Instant) -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| start.elapsed().as_nanos() as u64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut filter = String::new();
    let mut trials_arg: Option<usize> = None;
    let mut rounds = 3;
    let mut by_layer = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--trials" => trials_arg = it.next().and_then(|s| s.parse().ok()),
            "--rounds" => rounds = it.next().and_then(|s| s.parse().ok()).unwrap_or(3),
            "--by-layer" => by_layer = true,
            s if !s.starts_with('-') => filter = s.to_string(),
            _ => {}
        }
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../board-images/models");
    let t0 = Instant::now();
    println!(
        "{:<24} {:>9} {:>12} {:>7} {:>13} {:>13} {:>7} {:>7}",
        "model", "ms/inf", "inf/s", "trials", "reuse tr/s", "full tr/s", "ratio", "masked"
    );
    for size in ["tiny", "small"] {
        let Ok(test) = TestSet::load_size(&dir, size) else {
            continue;
        };
        for act in ["relu", "sigmoid", "hardsigmoid"] {
            for stage in ["fp32", "pruned", "int8"] {
                let name = format!("{size}-{act}-{stage}");
                if !name.contains(&filter) || !dir.join(format!("{name}.json")).exists() {
                    continue;
                }
                let model = match Model::load(&dir, &name) {
                    Ok(m) => Arc::new(m),
                    Err(e) => {
                        println!("{name}: {e}");
                        continue;
                    }
                };
                bench_model(&name, model, &test, trials_arg, rounds, t0, by_layer);
            }
        }
    }
}

fn bench_model(
    name: &str,
    model: Arc<Model>,
    test: &TestSet,
    trials_arg: Option<usize>,
    rounds: usize,
    t0: Instant,
    by_layer: bool,
) {
    let m = model.manifest();
    let ninputs: usize = std::env::var("DP_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let inputs: Vec<Vec<u8>> = (0..ninputs.min(test.n))
        .map(|i| match m.input.quant {
            Some(q) if m.input.dtype == proto::manifest::DType::I8 => {
                quantize_input(test.input(i), q)
                    .iter()
                    .map(|&v| v as u8)
                    .collect()
            }
            _ => test.input(i).iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
        .collect();
    let mut engine = Engine::new(model.clone());
    let pristine = model.pristine().to_vec();

    // Fault-free inference.
    let reps = if m.size == "tiny" { 50 } else { 5 };
    let mut per_inf = Vec::new();
    for _ in 0..rounds.max(3) {
        let s = cpu_ns(t0);
        for r in 0..reps {
            std::hint::black_box(
                engine
                    .run_full(&pristine, &inputs[r % inputs.len()], &[])
                    .expect("runs"),
            );
        }
        per_inf.push((cpu_ns(t0) - s) as f64 / reps as f64);
    }
    let inf_ns = median(per_inf);

    // Random single-bit parameter faults, uniform over the tensors' bits.
    let trials = trials_arg.unwrap_or(if m.size == "tiny" { 2000 } else { 200 });
    let total_bits: u64 = m.tensors.iter().map(|t| t.nbytes as u64 * 8).sum();
    let mut rng = ChaCha8Rng::seed_from_u64(2000);
    let faults: Vec<(usize, u8)> = (0..trials)
        .map(|_| {
            let mut k = rng.random_range(0..total_bits);
            for t in &m.tensors {
                let bits = t.nbytes as u64 * 8;
                if k < bits {
                    return (t.offset + (k / 8) as usize, (k % 8) as u8);
                }
                k -= bits;
            }
            unreachable!()
        })
        .collect();
    // Golden activations of every input are computed once, before timing.
    for x in &inputs {
        engine.run(&pristine, x, &[]).expect("runs");
    }
    let mut params = pristine.clone();
    let masked_before = engine.stats().runs_masked;
    let (mut reuse, mut full) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for pass in 0..2 {
            let use_reuse = (round + pass) % 2 == 0;
            if std::env::var("DP_ONLY").is_ok_and(|o| (o == "reuse") != use_reuse) {
                continue;
            }
            let s = cpu_ns(t0);
            for (t, &(byte, bit)) in faults.iter().enumerate() {
                params[byte] ^= 1 << bit;
                let x = &inputs[t % inputs.len()];
                let out = if use_reuse {
                    engine.run(&params, x, &[])
                } else {
                    engine.run_full(&params, x, &[])
                };
                std::hint::black_box(out.expect("runs"));
                params[byte] ^= 1 << bit;
            }
            let ns = (cpu_ns(t0) - s) as f64;
            if use_reuse { &mut reuse } else { &mut full }.push(ns);
        }
    }
    let masked = (engine.stats().runs_masked - masked_before) as f64 / (trials * rounds) as f64;
    if reuse.is_empty() || full.is_empty() {
        return;
    }
    let (r, f) = (median(reuse), median(full));
    println!(
        "{:<24} {:>9.3} {:>12.1} {:>7} {:>13.1} {:>13.1} {:>6.2}x {:>6.1}%",
        name,
        inf_ns / 1e6,
        1e9 / inf_ns,
        trials,
        trials as f64 * 1e9 / r,
        trials as f64 * 1e9 / f,
        f / r,
        masked * 100.0
    );
    if by_layer {
        // Mean time per trial by the layer hit: where reuse saves and where it cannot.
        let mut rows: Vec<(String, usize, f64, f64)> = Vec::new();
        for (t, &(byte, bit)) in faults.iter().enumerate() {
            let layer = m
                .tensors
                .iter()
                .find(|ti| (ti.offset..ti.offset + ti.nbytes).contains(&byte))
                .map_or("?", |ti| ti.layer.as_str());
            params[byte] ^= 1 << bit;
            let x = &inputs[t % inputs.len()];
            // Per-trial times are too short for the scheduler's CPU clock: wall clock.
            let s = Instant::now();
            std::hint::black_box(engine.run(&params, x, &[]).expect("runs"));
            let r = s.elapsed().as_nanos() as f64;
            let s = Instant::now();
            std::hint::black_box(engine.run_full(&params, x, &[]).expect("runs"));
            let f = s.elapsed().as_nanos() as f64;
            params[byte] ^= 1 << bit;
            match rows.iter_mut().find(|r| r.0 == layer) {
                Some(row) => {
                    row.1 += 1;
                    row.2 += r;
                    row.3 += f;
                }
                None => rows.push((layer.to_string(), 1, r, f)),
            }
        }
        for (layer, n, r, f) in rows {
            println!(
                "    {layer:<16} {n:>5} faults  reuse {:>8.3} ms  full {:>8.3} ms  {:>5.2}x",
                r / n as f64 / 1e6,
                f / n as f64 / 1e6,
                f / r
            );
        }
    }
}
