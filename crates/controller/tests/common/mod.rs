//! Shared helpers for whole-process tests: start the real `hil-controller`, talk to it
//! over real sockets, and a test agent that speaks proto v1 over the real websocket
//! (deterministic outcomes, a spool with acks, reconnects).

#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use proto::wire::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

pub const OPERATOR: &str = "operator-token-1";
pub const READER: &str = "reader-token-1";

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub struct Lab {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub config: PathBuf,
    pub child: Option<Child>,
}

impl Lab {
    /// Writes models and a config for `boards` (id -> extra YAML under the board).
    pub fn new(boards: &[&str], extra_timing: &str) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        controller::testutil::write_manifest(&models, "m-a", "i8", &[("l0", 16, 4), ("l1", 64, 0)]);
        controller::testutil::write_manifest(&models, "m-b", "f32", &[("l0", 16, 4)]);
        let port = free_port();
        let mut cfg = format!(
            "listen: 127.0.0.1:{port}\ndata_dir: {}\nmodels_dir: {}\ntokens:\n  users:\n    - {{name: op, token: {OPERATOR}, role: operator}}\n    - {{name: ro, token: {READER}, role: read_only}}\n  boards:\n",
            dir.path().join("data").display(),
            models.display()
        );
        for b in boards {
            cfg.push_str(&format!("    {b}: tok-{b}\n"));
        }
        cfg.push_str("boards:\n");
        for b in boards {
            cfg.push_str(&format!("  - {{id: {b}, labels: {{kind: test}}}}\n"));
        }
        cfg.push_str(&format!(
            "timing:\n  heartbeat_ms: 200\n  chunk_size: 8\n{extra_timing}"
        ));
        let config = dir.path().join("controller.yaml");
        std::fs::write(&config, cfg).unwrap();
        Lab {
            dir,
            port,
            config,
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/agent", self.port)
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("controller.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_hil-controller"))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        // Readiness loop, not a timing assertion: poll until /healthz answers.
        for _ in 0..600 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("controller did not start; log:\n{}", self.log());
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("controller.log")).unwrap_or_default()
    }

    pub fn client(&self, token: &str) -> controller::client::Client {
        controller::client::Client::new(&self.url(), Some(token.to_string()))
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn campaign_yaml(seed: u64, count: u64) -> String {
    format!(
        "name: t\nmodels: [m-a, m-b]\ninputs: [0, 1]\nfault:\n  kind: bit_flip\nstrata: [model, layer]\nsizing: {{method: fixed, count: {count}}}\nseed: {seed}\nboards: {{labels: {{kind: test}}}}\n"
    )
}

/// The test agent's physics: the outcome depends only on the fault, never on the board.
pub fn outcome_for(t: &TrialSpec, input: u32) -> Outcome {
    let bit = t.faults.first().map(|f| f.bits[0]).unwrap_or(0);
    let el = match t.faults.first().map(|f| &f.target) {
        Some(FaultTarget::Tensor { element, .. }) => *element,
        _ => 0,
    };
    if bit >= 30 {
        Outcome::NonFinite
    } else if bit == 7 && input == 1 {
        Outcome::SdcCritical
    } else if bit == 6 && (el + input as u64).is_multiple_of(2) {
        Outcome::SdcTolerable
    } else {
        Outcome::Masked
    }
}

#[derive(Default)]
pub struct AgentState {
    pub seq: u64,
    /// Records not yet acked (the spool).
    pub spool: Vec<Record>,
    pub job: Option<JobSpec>,
    pub queue: Vec<TrialSpec>,
    pub last_seen: bool,
    pub ran: u64,
    pub done_trials: std::collections::HashSet<(u64, u64, u32)>,
}

pub struct TestAgent {
    pub board: String,
    pub url: String,
    pub state: Arc<Mutex<AgentState>>,
    /// Inferences per second-ish pacing so tests can interrupt mid-campaign.
    pub delay_ms: u64,
}

pub enum Exit {
    /// The server closed with this code and reason.
    Closed(Option<(u16, String)>),
    Refused(String),
    Stopped,
}

impl TestAgent {
    pub fn new(board: &str, url: &str, delay_ms: u64) -> TestAgent {
        TestAgent {
            board: board.into(),
            url: url.into(),
            state: Default::default(),
            delay_ms,
        }
    }

    pub fn hello(&self, token: &str) -> Hello {
        let st = self.state.lock().unwrap();
        Hello {
            proto_version: PROTO_VERSION,
            proto_min_version: PROTO_MIN_VERSION,
            agent_version: "test-agent".into(),
            board_id: self.board.clone(),
            token: token.into(),
            capabilities: Capabilities {
                board_type: "test".into(),
                models: vec![
                    ModelInfo {
                        name: "m-a".into(),
                        activation: "relu".into(),
                        stage: "int8".into(),
                        params_bytes: 1,
                        inputs: 4,
                    },
                    ModelInfo {
                        name: "m-b".into(),
                        activation: "relu".into(),
                        stage: "fp32".into(),
                        params_bytes: 1,
                        inputs: 4,
                    },
                ],
                regions: vec![],
                rails: vec![],
                sensors: vec![],
            },
            features: features::ALL_V1.iter().map(|s| s.to_string()).collect(),
            spool_head: st.spool.last().map(|r| r.seq).unwrap_or(0),
            active_job: st.job.as_ref().map(|j| j.job_id),
        }
    }

    /// One session: connect, hello, run until `stop` fires or the link drops.
    pub async fn session(&self, stop: tokio::sync::watch::Receiver<bool>) -> Exit {
        let token = format!("tok-{}", self.board);
        let Ok((mut ws, _)) = tokio_tungstenite::connect_async(&self.url).await else {
            return Exit::Closed(None);
        };
        let hello = self.hello(&token);
        if ws
            .send(Message::Binary(AgentMsg::Hello(hello).encode().into()))
            .await
            .is_err()
        {
            return Exit::Closed(None);
        }
        let mut stop = stop;
        let mut hb = tokio::time::interval(Duration::from_millis(200));
        let mut work = tokio::time::interval(Duration::from_millis(self.delay_ms.max(1)));
        let mut welcomed = false;
        loop {
            tokio::select! {
                _ = stop.changed() => return Exit::Stopped,
                m = ws.next() => {
                    let m = match m {
                        Some(Ok(m)) => m,
                        _ => return Exit::Closed(None),
                    };
                    let b = match m {
                        Message::Binary(b) => b,
                        Message::Close(f) => return Exit::Closed(f.map(|f| (u16::from(f.code), f.reason.to_string()))),
                        _ => continue,
                    };
                    let Ok(cm) = ControllerMsg::decode(&b) else { continue };
                    let mut out = Vec::new();
                    {
                        let mut st = self.state.lock().unwrap();
                        match cm {
                            ControllerMsg::Welcome(w) => {
                                welcomed = true;
                                st.spool.retain(|r| r.seq > w.committed_upto);
                                if !st.spool.is_empty() {
                                    out.push(AgentMsg::Records(RecordBatch { records: st.spool.clone() }));
                                }
                            }
                            ControllerMsg::Refused { reason } => return Exit::Refused(reason),
                            ControllerMsg::Ack { upto } => st.spool.retain(|r| r.seq > upto),
                            ControllerMsg::Job(j) => {
                                if st.job.as_ref().map(|x| x.job_id) == Some(j.job_id) {
                                    continue;
                                }
                                if st.job.is_some() {
                                    out.push(AgentMsg::JobState(JobState { job_id: j.job_id, state: JobPhase::Failed, detail: Some("busy".into()) }));
                                } else if j.mode == JobMode::Health {
                                    let mut recs = Vec::new();
                                    for i in &j.inputs {
                                        st.seq += 1;
                                        recs.push(rec(st.seq, &j, 0, 0, *i, Outcome::Masked));
                                    }
                                    st.spool.extend(recs.clone());
                                    out.push(AgentMsg::Records(RecordBatch { records: recs }));
                                    out.push(AgentMsg::JobState(JobState { job_id: j.job_id, state: JobPhase::Finished, detail: None }));
                                } else {
                                    out.push(AgentMsg::JobState(JobState { job_id: j.job_id, state: JobPhase::Started, detail: None }));
                                    out.push(AgentMsg::JobState(JobState { job_id: j.job_id, state: JobPhase::GoldenReady { p99_ns: 1_000_000, timeout_ns: 10_000_000 }, detail: None }));
                                    st.job = Some(j);
                                    st.queue.clear();
                                    st.last_seen = false;
                                }
                            }
                            ControllerMsg::Trials(c) => {
                                if let Some(campaign) = st.job.as_ref().filter(|j| j.job_id == c.job_id).map(|j| j.campaign_id) {
                                    for t in c.trials {
                                        let k = (campaign, t.trial_id, t.attempt);
                                        if !st.done_trials.contains(&k) && !st.queue.iter().any(|q| (campaign, q.trial_id, q.attempt) == k) {
                                            st.queue.push(t);
                                        }
                                    }
                                    st.last_seen |= c.last;
                                }
                            }
                            ControllerMsg::Cancel { job_id } => {
                                if st.job.as_ref().map(|j| j.job_id) == Some(job_id) {
                                    st.job = None;
                                    st.queue.clear();
                                }
                                out.push(AgentMsg::JobState(JobState { job_id, state: JobPhase::Cancelled, detail: None }));
                            }
                            ControllerMsg::HeartbeatAck { .. } => {}
                        }
                    }
                    for o in out {
                        if ws.send(Message::Binary(o.encode().into())).await.is_err() {
                            return Exit::Closed(None);
                        }
                    }
                }
                _ = hb.tick(), if welcomed => {
                    let seq = self.state.lock().unwrap().seq;
                    if ws.send(Message::Binary(AgentMsg::Heartbeat { seq, unix_ms: 0 }.encode().into())).await.is_err() {
                        return Exit::Closed(None);
                    }
                }
                _ = work.tick(), if welcomed => {
                    let mut out = Vec::new();
                    {
                        let mut st = self.state.lock().unwrap();
                        if let Some(j) = st.job.clone() {
                            if !st.queue.is_empty() {
                                let t = st.queue.remove(0);
                                let mut recs = Vec::new();
                                for i in &j.inputs {
                                    st.seq += 1;
                                    recs.push(rec(st.seq, &j, t.trial_id, t.attempt, *i, outcome_for(&t, *i)));
                                }
                                st.done_trials.insert((j.campaign_id, t.trial_id, t.attempt));
                                st.ran += 1;
                                st.spool.extend(recs.clone());
                                out.push(AgentMsg::Records(RecordBatch { records: recs }));
                            } else if st.last_seen {
                                out.push(AgentMsg::JobState(JobState { job_id: j.job_id, state: JobPhase::Finished, detail: None }));
                                st.job = None;
                            }
                        }
                    }
                    for o in out {
                        if ws.send(Message::Binary(o.encode().into())).await.is_err() {
                            return Exit::Closed(None);
                        }
                    }
                }
            }
        }
    }

    /// Reconnects forever until `stop` fires.
    pub async fn run(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            match self.session(stop.clone()).await {
                Exit::Stopped => return,
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

pub fn rec(
    seq: u64,
    j: &JobSpec,
    trial: u64,
    attempt: u32,
    input: u32,
    outcome: Outcome,
) -> Record {
    Record {
        seq,
        job_id: j.job_id,
        campaign_id: j.campaign_id,
        trial_id: trial,
        attempt,
        input,
        outcome,
        mismatched_pixels: if outcome == Outcome::Masked { 0 } else { 10 },
        nonfinite: 0,
        iou_vs_golden: 1.0,
        iou_vs_truth: 0.8,
        golden_iou_vs_truth: 0.8,
        latency_ns: 1_000_000,
        cycles: 300_000,
        power_w: 3.0,
        vccint_mv: 850.0,
        temp_c: 45.0,
        start_unix_ns: 0,
        end_unix_ns: 0,
        detail: None,
    }
}

/// Polls the API until the campaign is finished (a readiness loop with a generous cap
/// so a wedged run fails instead of hanging CI).
pub async fn wait_finished(
    c: &controller::client::Client,
    id: u64,
    lab_log: impl Fn() -> String,
) -> String {
    for _ in 0..3000 {
        if let Ok(v) = c.json("GET", &format!("/api/campaigns/{id}"), None).await {
            let s = v["state"].as_str().unwrap_or("").to_string();
            if matches!(s.as_str(), "done" | "cancelled" | "timed_out") {
                return s;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "campaign {id} did not finish; controller log:\n{}",
        lab_log()
    );
}

pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}
