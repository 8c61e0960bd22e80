//! hil-agent against real kv260-sim processes and a real websocket controller.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use proto::wire::{FaultKind, FaultSpec, FaultTarget, JobPhase, Outcome, Persistence, TrialSpec};

const TOKEN: &str = "board-token-1";
const MODEL: &str = "tiny-relu-int8";
const LONG: Duration = Duration::from_secs(240);

/// A started `hil-agent` in `<dir>/agent`, dialling the test controller.
fn start_agent(dir: &std::path::Path, ctl: &Ctl, sim: &SimProc, opts: AgentOpts) -> AgentProc {
    let mut agent = AgentProc::new(&dir.join("agent"), &ctl.url(), sim, TOKEN, opts);
    agent.start();
    agent
}

fn setup(name: &str, seed: u64) -> (tempfile::TempDir, SimProc, Ctl) {
    let t = tempfile::Builder::new().prefix(name).tempdir().unwrap();
    let sim = SimProc::start(&t.path().join("sim"), seed);
    let ctl = Ctl::start(TOKEN);
    (t, sim, ctl)
}

fn dump(agent: &AgentProc, ctl: &Ctl) -> String {
    let st = ctl.with(|s| {
        format!(
            "records={} committed={} hellos={} states={:?} gaps={:?} errors={:?}",
            s.records.len(),
            s.committed,
            s.hellos,
            s.states,
            s.gaps,
            s.errors
        )
    });
    format!("{st}\n--- agent log ---\n{}", agent.log())
}

fn wait_or_dump(what: &str, agent: &AgentProc, ctl: &Ctl, mut f: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < LONG,
            "timed out waiting for: {what}\n{}",
            dump(agent, ctl)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn job_of_500_trials_survives_two_kills_and_three_cuts() {
    let (t, sim, ctl) = setup("e2e-500", 1);
    ctl.set_job(job(1, MODEL, vec![0]), flip_trials(500, vec![]));
    let mut agent = start_agent(t.path(), &ctl, &sim, AgentOpts::default());
    // Interruptions at increasing record counts: kill, cut, cut, kill, cut.
    let plan: [(usize, &str); 5] = [
        (60, "kill"),
        (150, "cut"),
        (220, "cut"),
        (300, "kill"),
        (380, "cut"),
    ];
    for (at, what) in plan {
        wait_or_dump(&format!("{at} records before {what}"), &agent, &ctl, || {
            ctl.records() >= at
        });
        let hellos = ctl.with(|s| s.hellos);
        match what {
            "kill" => {
                agent.kill();
                agent.start();
            }
            _ => ctl.cut(),
        }
        wait_or_dump(
            &format!("reconnect after {what} at {at}"),
            &agent,
            &ctl,
            || ctl.with(|s| s.hellos > hellos),
        );
        assert!(
            ctl.records() < 500,
            "the job finished before the {what} at {at}"
        );
    }
    wait_until("job finished with 500 records", LONG, || {
        ctl.with(|s| s.finished(1) && s.records.len() >= 500)
    });
    ctl.with(|s| {
        assert!(s.gaps.is_empty(), "seq gaps: {:?}", s.gaps);
        assert!(
            s.duplicate_keys.is_empty(),
            "re-run trials: {:?}",
            s.duplicate_keys
        );
        assert_eq!(s.records.len(), 500, "{}", dump(&agent, &ctl));
        let mut trials: Vec<u64> = s.records.values().map(|r| r.trial_id).collect();
        trials.sort();
        assert_eq!(trials, (0..500).collect::<Vec<_>>());
        assert!(
            s.hellos >= 6,
            "expected >= 6 sessions (2 kills + 3 cuts), got {}",
            s.hellos
        );
        for r in s.records.values() {
            assert!(
                !matches!(
                    r.outcome,
                    Outcome::Refused | Outcome::InfraError | Outcome::Crash
                ),
                "unexpected {r:?}"
            );
            assert!(r.latency_ns > 0 && r.cycles > 0, "{r:?}");
        }
        // Bit flips in the first conv's weights do change some outputs.
        let failures = s
            .records
            .values()
            .filter(|r| r.outcome.is_failure())
            .count();
        assert!(failures > 0, "no injected flip changed anything");
        assert!(s.telemetry > 0 && s.heartbeats > 0);
    });
    assert_eq!(sim.vccint_mv(), Some(850));
}

#[test]
fn undervolt_below_vcrash_is_reported_as_a_crash_and_the_job_continues() {
    let (t, sim, ctl) = setup("e2e-crash", 2);
    let vcrash = sim.threshold("vcrash_mv");
    // Below this board's Vcrash, above the board file's hard minimum (500 mV).
    let low = ((vcrash as u32 - 10) / 10 * 10).max(500);
    assert!(
        f64::from(low) < vcrash,
        "vcrash {vcrash} too close to the rail minimum"
    );
    let mut trials = flip_trials(6, vec![]);
    // A safe undervolt (well above Vmin): its records must carry that trial's read-back.
    trials[1].voltages = vec![("vccint".into(), 700)];
    trials[3].voltages = vec![("vccint".into(), low)];
    ctl.set_job(job(2, MODEL, vec![0, 1]), trials);
    let agent = start_agent(t.path(), &ctl, &sim, AgentOpts::default());
    wait_until("crash records", LONG, || {
        ctl.with(|s| s.records.values().any(|r| r.outcome == Outcome::Crash))
    });
    // The lab power-cycles a crashed board (the controller's job).
    assert!(sim.power("cycle").starts_with("ok"));
    wait_until("job finished after the crash", LONG, || {
        ctl.with(|s| s.finished(2))
    });
    ctl.with(|s| {
        assert_eq!(s.records.len(), 12, "{}", dump(&agent, &ctl));
        for r in s.records.values() {
            if r.trial_id == 1 {
                assert!((r.vccint_mv - 700.0).abs() <= 25.0, "stale VCCINT: {r:?}");
            }
            if r.trial_id == 3 {
                assert_eq!(r.outcome, Outcome::Crash, "{r:?}");
                assert!(
                    r.detail.as_deref().unwrap_or("").contains("answer"),
                    "{r:?}"
                );
            } else {
                assert!(
                    !matches!(r.outcome, Outcome::Crash | Outcome::Refused),
                    "{r:?}"
                );
            }
        }
    });
    assert_eq!(sim.vccint_mv(), Some(850));
}

#[test]
fn golden_recheck_runs_at_nominal_so_undervolt_upsets_do_not_make_the_board_suspect() {
    let (t, sim, ctl) = setup("e2e-golden-nominal", 9);
    let vhang = sim.threshold("vhang_mv");
    let vmin = sim.threshold("vmin_mv");
    // Between Vhang and Vmin: upsets, but no hang.
    let low = ((vhang as u32) / 10 + 1) * 10;
    assert!(f64::from(low) < vmin - 5.0, "vhang {vhang} / vmin {vmin}");
    let trials: Vec<TrialSpec> = (0..8)
        .map(|i| TrialSpec {
            trial_id: i,
            attempt: 0,
            faults: vec![],
            voltages: vec![("vccint".into(), low)],
        })
        .collect();
    let mut spec = job(9, MODEL, vec![0, 1]);
    spec.golden_every = 1;
    ctl.set_job(spec, trials);
    let agent = start_agent(t.path(), &ctl, &sim, AgentOpts::default());
    wait_or_dump("job ended", &agent, &ctl, || {
        ctl.with(|s| {
            matches!(
                s.phase(9),
                Some(JobPhase::Finished | JobPhase::Suspect | JobPhase::Failed)
            )
        })
    });
    ctl.with(|s| {
        assert_eq!(
            s.phase(9),
            Some(JobPhase::Finished),
            "{}",
            dump(&agent, &ctl)
        );
        assert_eq!(s.records.len(), 16, "{}", dump(&agent, &ctl));
        // The set-point really does upset this board: a re-check there would fail.
        let failures = s
            .records
            .values()
            .filter(|r| r.outcome.is_failure())
            .count();
        assert!(failures > 0, "no upsets at {low} mV: {:?}", s.records);
        for r in s.records.values() {
            assert!((r.vccint_mv - low as f32).abs() <= 25.0, "{r:?}");
        }
    });
    assert_eq!(sim.vccint_mv(), Some(850));
}

#[test]
fn out_of_range_voltage_and_non_injectable_pokes_are_refused_with_records() {
    let (t, sim, ctl) = setup("e2e-refuse", 3);
    let mut trials = flip_trials(5, vec![]);
    trials[1].voltages = vec![("vccint".into(), 400)];
    trials[2].faults = vec![FaultSpec {
        target: FaultTarget::Region {
            name: "accel".into(),
            offset: 0,
        },
        bits: vec![0],
        kind: FaultKind::StuckAt1,
        persistence: Persistence::Transient,
    }];
    trials[3].faults = vec![FaultSpec {
        target: FaultTarget::Region {
            name: "params".into(),
            offset: 0x0800_0000,
        },
        bits: vec![1],
        kind: FaultKind::BitFlip,
        persistence: Persistence::Transient,
    }];
    trials[4].voltages = vec![("vccint".into(), 950)];
    ctl.set_job(job(3, MODEL, vec![0]), trials);
    let agent = start_agent(t.path(), &ctl, &sim, AgentOpts::default());
    wait_until("job finished", LONG, || ctl.with(|s| s.finished(3)));
    ctl.with(|s| {
        let by: std::collections::HashMap<u64, &proto::wire::Record> =
            s.records.values().map(|r| (r.trial_id, r)).collect();
        assert_eq!(by.len(), 5, "{}", dump(&agent, &ctl));
        assert_ne!(by[&0].outcome, Outcome::Refused);
        let detail = |i: u64| by[&i].detail.clone().unwrap_or_default();
        assert_eq!(by[&1].outcome, Outcome::Refused);
        assert!(
            detail(1).contains("400 mV is outside the hard limits 500..=900"),
            "{}",
            detail(1)
        );
        assert_eq!(by[&2].outcome, Outcome::Refused);
        assert!(
            detail(2).contains("\"accel\" is not injectable"),
            "{}",
            detail(2)
        );
        assert_eq!(by[&3].outcome, Outcome::Refused);
        assert!(
            detail(3).contains("outside region \"params\""),
            "{}",
            detail(3)
        );
        assert_eq!(by[&4].outcome, Outcome::Refused);
        assert!(detail(4).contains("950 mV"), "{}", detail(4));
    });
    // Nothing was ever set outside the limits.
    assert_eq!(sim.vccint_mv(), Some(850));
}

#[test]
fn accelerator_id_mismatch_refuses_the_job() {
    let (t, sim, ctl) = setup("e2e-id", 4);
    let bf = t.path().join("wrong-id.yaml");
    let text =
        std::fs::read_to_string(workspace().join("board-images/boards/kv260-sim.yaml")).unwrap();
    std::fs::write(&bf, text.replace("id: 0x4B563236", "id: 0x12345678")).unwrap();
    ctl.set_job(job(4, MODEL, vec![0]), flip_trials(3, vec![]));
    let opts = AgentOpts {
        board_file: bf,
        ..Default::default()
    };
    let agent = start_agent(t.path(), &ctl, &sim, opts);
    wait_until("job failed", LONG, || {
        ctl.with(|s| s.phase(4) == Some(JobPhase::Failed))
    });
    wait_until("refusal records", LONG, || ctl.records() >= 3);
    ctl.with(|s| {
        let st = s.states.iter().rev().find(|s| s.job_id == 4).unwrap();
        let d = st.detail.clone().unwrap_or_default();
        assert!(d.contains("0x4b563236") && d.contains("0x12345678"), "{d}");
        for r in s.records.values() {
            assert_eq!(r.outcome, Outcome::Refused, "{r:?}");
        }
    });
    drop(agent);
}

/// Trials that hold VCCINT at 800 mV (inside the guardband) for a while.
fn held_low(n: u64) -> Vec<TrialSpec> {
    flip_trials(n, vec![("vccint".into(), 800)])
}

#[test]
fn nominal_voltage_is_back_after_sigterm() {
    let (t, sim, ctl) = setup("e2e-term", 5);
    ctl.set_job(job(5, MODEL, vec![0]), held_low(100_000));
    let mut agent = start_agent(t.path(), &ctl, &sim, AgentOpts::default());
    wait_until("trials running at 800 mV", LONG, || ctl.records() >= 5);
    assert_eq!(sim.vccint_mv(), Some(800));
    agent.signal(Signal::SIGTERM);
    let st = agent
        .wait_exit(Duration::from_secs(60))
        .expect("agent exits on SIGTERM");
    assert!(st.success(), "{st:?}\n{}", dump(&agent, &ctl));
    assert_eq!(sim.vccint_mv(), Some(850));
}

#[test]
fn nominal_voltage_is_back_after_controller_loss() {
    let (t, sim, ctl) = setup("e2e-loss", 6);
    ctl.set_job(job(6, MODEL, vec![0]), held_low(100_000));
    let opts = AgentOpts {
        grace_ms: 1500,
        ..Default::default()
    };
    let agent = start_agent(t.path(), &ctl, &sim, opts);
    wait_until("trials running at 800 mV", LONG, || ctl.records() >= 5);
    assert_eq!(sim.vccint_mv(), Some(800));
    ctl.st.lock().unwrap().accept = false;
    ctl.cut();
    wait_until(
        "nominal restored after the grace period",
        Duration::from_secs(60),
        || sim.vccint_mv() == Some(850),
    );
    // And it stays there while the controller is away.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sim.vccint_mv(), Some(850), "{}", dump(&agent, &ctl));
    // Controller back: the job resumes (at 800 mV again).
    let before = ctl.records();
    ctl.st.lock().unwrap().accept = true;
    wait_until("job resumes", LONG, || ctl.records() > before + 5);
}

#[test]
fn nominal_voltage_is_back_after_a_panic() {
    let (t, sim, ctl) = setup("e2e-panic", 7);
    ctl.set_job(job(7, MODEL, vec![0]), held_low(1000));
    let mut agent = AgentProc::new(
        &t.path().join("agent"),
        &ctl.url(),
        &sim,
        TOKEN,
        AgentOpts::default(),
    );
    agent.env("HIL_AGENT_TEST_PANIC_AT_TRIAL", "8");
    agent.start();
    let st = agent.wait_exit(LONG).expect("agent exits after the panic");
    assert_eq!(st.code(), Some(101), "{}", dump(&agent, &ctl));
    assert!(agent.log().contains("test-only panic"), "{}", agent.log());
    assert_eq!(sim.vccint_mv(), Some(850));
}

#[test]
fn field_mode_runs_canaries_against_the_golden() {
    let (t, sim, ctl) = setup("e2e-field", 8);
    let mut spec = job(8, MODEL, vec![0, 1]);
    spec.mode = proto::wire::JobMode::Field {
        period_ms: 50,
        rounds: Some(5),
    };
    ctl.set_job(spec, vec![]);
    let agent = start_agent(t.path(), &ctl, &sim, AgentOpts::default());
    wait_until("field job finished", LONG, || ctl.with(|s| s.finished(8)));
    ctl.with(|s| {
        assert_eq!(s.records.len(), 10, "{}", dump(&agent, &ctl));
        let mut rounds: Vec<u64> = s.records.values().map(|r| r.trial_id).collect();
        rounds.dedup();
        assert_eq!(rounds, vec![0, 1, 2, 3, 4]);
        for r in s.records.values() {
            // Nominal voltage, no injection: the canary matches the golden.
            assert_eq!(r.outcome, Outcome::Masked, "{r:?}");
            assert!(
                r.power_w > 0.0 && r.vccint_mv > 800.0 && r.temp_c > 0.0,
                "{r:?}"
            );
        }
    });
}

#[test]
fn wss_with_a_private_ca() {
    let t = tempfile::Builder::new()
        .prefix("e2e-wss")
        .tempdir()
        .unwrap();
    let sim = SimProc::start(&t.path().join("sim"), 9);
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let ca = t.path().join("lab-ca.pem");
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let ctl = Ctl::start_tls(
        TOKEN,
        ck.cert.der().to_vec(),
        ck.signing_key.serialize_der(),
    );
    ctl.set_job(job(9, MODEL, vec![0]), flip_trials(5, vec![]));
    let opts = AgentOpts {
        ca_file: Some(ca),
        ..Default::default()
    };
    let mut agent = AgentProc::new(&t.path().join("agent"), &ctl.wss_url(), &sim, TOKEN, opts);
    agent.start();
    wait_until("job over wss finished", LONG, || {
        ctl.with(|s| s.finished(9) && s.records.len() == 5)
    });
    drop(agent);
}
