//! Trials/s of the full agent loop (inject, run, classify, spool with fsync, send to a
//! local websocket sink) against a raw loop driving the same emulated accelerator with
//! no agent work (write input, ap_start, wait, read output), on `tiny-relu-int8`.
//! Rounds alternate the order (raw first, then agent first...); the medians are
//! compared. Also prints the real hil-agent process's peak RSS (VmHWM).
//!
//! Targets: ratio >= 0.95, peak RSS < 32 MiB. `cargo bench -p agent --bench trial_loop`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::driver::{Hls, RunResult};
use agent::hw::devmem::MmioWindow;
use common::*;
use proto::board::BoardFile;
use proto::wire::JobPhase;

const MODEL: &str = "tiny-relu-int8";
const TOKEN: &str = "bench";

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Raw {
    hls: Hls,
    params: Arc<MmioWindow>,
    /// Offset of `enc0.conv0.weight` in the params region (model slot + tensor offset).
    weight_off: u64,
    input: Arc<MmioWindow>,
    output: Arc<MmioWindow>,
    bytes: Vec<u8>,
    out: Vec<u8>,
}

impl Raw {
    fn new(sim: &SimProc) -> Raw {
        let ws = workspace();
        let file = BoardFile::load(&ws.join("board-images/boards/kv260-sim.yaml")).unwrap();
        let models = ws.join("board-images/models");
        let map = |name: &str| {
            Arc::new(agent::board::map_region(&file, &sim.dir, file.region(name).unwrap()).unwrap())
        };
        let a = &file.accelerator;
        let regs = map(&a.region);
        let hls = Hls::new(regs, a.regs.clone(), a.clock_hz);
        let id = agent::trial::engine::list_models(&models)
            .iter()
            .position(|m| m == MODEL)
            .unwrap() as u32;
        let (m, _) = proto::model_files::load_model(&models, MODEL).unwrap();
        let ts = proto::model_files::TestSet::load_size(&models, &m.size).unwrap();
        let q = m.input.quant.unwrap();
        let bytes: Vec<u8> = proto::model_files::quantize_input(ts.input(0), q)
            .into_iter()
            .map(|v| v as u8)
            .collect();
        let (input, output) = (map(&a.input_region), map(&a.output_region));
        let params = map(&a.params_region);
        let slot =
            file.model_params_addr(id).unwrap() - file.region(&a.params_region).unwrap().base;
        let weight_off = slot + m.tensor("enc0.conv0.weight").unwrap().offset as u64;
        hls.configure(
            file.region(&a.input_region).unwrap().base,
            file.region(&a.output_region).unwrap().base,
            file.model_params_addr(id).unwrap(),
            id,
        )
        .unwrap();
        Raw {
            hls,
            params,
            weight_off,
            input,
            output,
            bytes,
            out: vec![0u8; m.output.nbytes()],
        }
    }

    /// The same accelerator workload as the agent's trials (the same bit flipped in
    /// the same weight, so the emulator recomputes the same layers), with none of the
    /// agent's work: poke, run, read, unpoke.
    fn run(&mut self, n: usize) -> f64 {
        let t0 = Instant::now();
        for i in 0..n as u64 {
            let byte = self.weight_off + (i * 37) % 200;
            let word = byte & !3;
            let mask = 1u32 << ((byte % 4) * 8 + i % 8);
            let orig = self.params.read32(word).unwrap();
            self.params.write32(word, orig ^ mask).unwrap();
            self.input.write_bytes(0, &self.bytes).unwrap();
            let r = self.hls.run(Duration::from_secs(5)).unwrap();
            assert!(matches!(r, RunResult::Done { .. }), "raw loop: {r:?}");
            self.output.read_bytes(0, &mut self.out).unwrap();
            self.params.write32(word, orig).unwrap();
        }
        n as f64 / t0.elapsed().as_secs_f64()
    }
}

fn main() {
    let n: usize = std::env::var("TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let t = tempfile::Builder::new()
        .prefix("bench-trial-loop")
        .tempdir()
        .unwrap();
    let sim = SimProc::start(&t.path().join("sim"), 11);
    let ctl = Ctl::start(TOKEN);
    ctl.st.lock().unwrap().feed_window = usize::MAX / 4;
    let mut agent = AgentProc::new(
        &t.path().join("agent"),
        &ctl.url(),
        &sim,
        TOKEN,
        AgentOpts::default(),
    );
    agent.start();
    let mut raw = Raw::new(&sim);
    raw.run(50); // warm the emulator's hot poll and the page cache

    let agent_round = |job_id: u64| -> f64 {
        let mut spec = job(job_id, MODEL, vec![0]);
        spec.campaign_id = job_id; // distinct record keys per round
        ctl.set_job(spec, flip_trials(n as u64, vec![]));
        let t_ready = {
            let t0 = Instant::now();
            loop {
                let ready = ctl.with(|s| {
                    s.states.iter().any(|st| {
                        st.job_id == job_id && matches!(st.state, JobPhase::GoldenReady { .. })
                    })
                });
                if ready {
                    break Instant::now();
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(120),
                    "no GoldenReady for job {job_id}\n{}",
                    agent.log()
                );
                std::thread::sleep(Duration::from_micros(200));
            }
        };
        let t0 = Instant::now();
        loop {
            let done = ctl
                .with(|s| s.finished(job_id) && s.per_job.get(&job_id).copied().unwrap_or(0) >= n);
            if done {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(600),
                "job {job_id} did not finish\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        let tps = n as f64 / t_ready.elapsed().as_secs_f64();
        // Let the agent clear the acked job before the next one arrives.
        std::thread::sleep(Duration::from_millis(300));
        tps
    };

    let (mut raws, mut agents) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let job_id = 100 + r as u64;
        if r % 2 == 0 {
            raws.push(raw.run(n));
            agents.push(agent_round(job_id));
        } else {
            agents.push(agent_round(job_id));
            raws.push(raw.run(n));
        }
        println!(
            "round {r}: raw {:.1} inferences/s, agent {:.1} trials/s",
            raws[r], agents[r]
        );
    }
    let hwm = agent.vm_hwm_kib().unwrap_or(0);
    let (mr, ma) = (median(&mut raws), median(&mut agents));
    let ratio = ma / mr;
    println!(
        "trial_loop (tiny-relu-int8, 1 input/trial, {n} trials x {rounds} rounds, alternating order):"
    );
    println!("  raw loop (no agent work):            {mr:.1} trials/s (median)");
    println!(
        "  full agent loop (inject, run, classify, spool+fsync, websocket): {ma:.1} trials/s (median)"
    );
    println!(
        "  ratio agent/raw: {ratio:.3}   (target >= 0.95) {}",
        if ratio >= 0.95 { "OK" } else { "BELOW TARGET" }
    );
    println!(
        "  hil-agent peak RSS (VmHWM): {:.1} MiB   (target < 32 MiB) {}",
        hwm as f64 / 1024.0,
        if hwm > 0 && hwm < 32 * 1024 {
            "OK"
        } else {
            "ABOVE TARGET"
        }
    );
    ctl.with(|s| assert!(s.duplicate_keys.is_empty() && s.gaps.is_empty()));
}
