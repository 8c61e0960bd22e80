//! Whole-process test fixtures: a real `kv260-sim` process, the real `hil-agent`
//! binary, and a minimal controller speaking proto v1 over a real websocket.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use proto::smbus::{self, Request};
use proto::wire::{
    self, AgentMsg, ControllerMsg, JobPhase, JobSpec, JobState, Record, TrialChunk, TrialSpec,
    Welcome,
};
use tokio_tungstenite::tungstenite::Message;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// target/<profile>/ of this test or bench executable.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/x")
        .to_path_buf()
}

/// The emulator binary next to ours; built once if missing.
pub fn sim_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = profile_dir();
        let bin = dir.join("kv260-sim");
        if !bin.exists() {
            let release = dir.file_name().is_some_and(|n| n == "release");
            let mut c = Command::new(env!("CARGO"));
            c.args(["build", "-p", "sim", "--bin", "kv260-sim"]);
            if release {
                c.arg("--release");
            }
            if let Some(t) = dir.parent() {
                c.env("CARGO_TARGET_DIR", t);
            }
            let st = c
                .current_dir(workspace())
                .status()
                .expect("running cargo build -p sim");
            assert!(st.success(), "cargo build -p sim failed");
        }
        bin
    })
    .clone()
}

pub fn agent_bin() -> PathBuf {
    // Benches have no CARGO_BIN_EXE_*; the binary sits next to them.
    option_env!("CARGO_BIN_EXE_hil-agent")
        .map(PathBuf::from)
        .unwrap_or_else(|| profile_dir().join("hil-agent"))
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct SimProc {
    child: Child,
    pub dir: PathBuf,
    pub info: serde_json::Value,
}

impl SimProc {
    pub fn start(dir: &Path, seed: u64) -> SimProc {
        std::fs::create_dir_all(dir).unwrap();
        let log = std::fs::File::create(dir.join("sim.log")).unwrap();
        let mut child = Command::new(sim_bin())
            .arg("--board")
            .arg(workspace().join("board-images/boards/kv260-sim.yaml"))
            .arg("--state-dir")
            .arg(dir)
            .arg("--seed")
            .arg(seed.to_string())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawning kv260-sim");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let info: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("kv260-sim info line {line:?}: {e}"));
        let s = SimProc {
            child,
            dir: dir.to_path_buf(),
            info,
        };
        wait_until("the emulated board boots", Duration::from_secs(30), || {
            s.vccint_mv().is_some()
        });
        s
    }

    pub fn threshold(&self, name: &str) -> f64 {
        self.info["physics"][name]
            .as_f64()
            .unwrap_or_else(|| panic!("physics.{name} in {}", self.info))
    }

    pub fn smbus_read(&self, addr: u8, reg: u8) -> Option<u8> {
        let mut s = UnixStream::connect(self.dir.join("i2c-1.sock")).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        smbus::transact(&mut s, &Request::read_byte_data(addr, reg))
            .ok()?
            .byte()
    }

    /// VCCINT as programmed in the DA9130 (0x32, BUCK1_5 0x25): code x 10 mV.
    pub fn vccint_mv(&self) -> Option<u32> {
        self.smbus_read(0x32, 0x25).map(|c| u32::from(c) * 10)
    }

    pub fn power(&self, cmd: &str) -> String {
        use std::io::Write;
        let mut s = UnixStream::connect(self.dir.join("power.sock")).expect("power socket");
        s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        line.trim().to_string()
    }
}

impl Drop for SimProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct AgentProc {
    child: Option<Child>,
    pub cfg: PathBuf,
    pub dir: PathBuf,
    env: Vec<(String, String)>,
    starts: u32,
}

pub struct AgentOpts {
    pub grace_ms: u64,
    pub board_file: PathBuf,
    pub ca_file: Option<PathBuf>,
}

impl Default for AgentOpts {
    fn default() -> Self {
        AgentOpts {
            grace_ms: 3000,
            board_file: workspace().join("board-images/boards/kv260-sim.yaml"),
            ca_file: None,
        }
    }
}

impl AgentProc {
    pub fn new(dir: &Path, url: &str, sim: &SimProc, token: &str, o: AgentOpts) -> AgentProc {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
        let cfg = dir.join("agent.yaml");
        let ca = o
            .ca_file
            .as_ref()
            .map(|p| format!("ca_file: {}\n", p.display()))
            .unwrap_or_default();
        std::fs::write(
            &cfg,
            ca + &format!(
                "controller_url: {url}\nboard_id: sim-0\ntoken_file: token\nboard_file: {}\n\
                 hw_root: {}\nmodels_dir: {}\nstate_dir: state\ncontroller_grace_ms: {}\n\
                 telemetry_hz: 5\n",
                o.board_file.display(),
                sim.dir.display(),
                workspace().join("board-images/models").display(),
                o.grace_ms
            ),
        )
        .unwrap();
        AgentProc {
            child: None,
            cfg,
            dir: dir.to_path_buf(),
            env: Vec::new(),
            starts: 0,
        }
    }

    pub fn env(&mut self, k: &str, v: &str) {
        self.env.push((k.into(), v.into()));
    }

    pub fn start(&mut self) {
        self.starts += 1;
        let log =
            std::fs::File::create(self.dir.join(format!("agent-{}.log", self.starts))).unwrap();
        let mut c = Command::new(agent_bin());
        c.arg("--config")
            .arg(&self.cfg)
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        self.child = Some(c.spawn().expect("spawning hil-agent"));
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let t0 = Instant::now();
        loop {
            let c = self.child.as_mut()?;
            if let Some(st) = c.try_wait().unwrap() {
                self.child = None;
                return Some(st);
            }
            if t0.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak RSS (VmHWM) of the running agent, in KiB.
    pub fn vm_hwm_kib(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        s.lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                std::fs::read_to_string(self.dir.join(format!("agent-{i}.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n----- restart -----\n")
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Default)]
pub struct CtlState {
    pub token: String,
    pub committed: u64,
    pub records: BTreeMap<u64, Record>,
    /// (campaign, trial, attempt, input) -> seq, to catch a re-run trial.
    pub keys: HashMap<(u64, u64, u32, u32), u64>,
    pub duplicate_keys: Vec<Record>,
    pub gaps: Vec<String>,
    pub job: Option<(JobSpec, Vec<TrialSpec>)>,
    /// Bumped by `set_job`, so live connections feed a new job too.
    pub job_gen: u64,
    /// How many trials beyond the finished ones are sent ahead.
    pub feed_window: usize,
    pub per_job: HashMap<u64, usize>,
    pub states: Vec<JobState>,
    pub hellos: u32,
    pub accept: bool,
    pub connected: bool,
    pub telemetry: u32,
    pub heartbeats: u32,
    pub errors: Vec<String>,
}

impl CtlState {
    pub fn finished(&self, job: u64) -> bool {
        self.states
            .iter()
            .any(|s| s.job_id == job && s.state == JobPhase::Finished)
    }
    pub fn phase(&self, job: u64) -> Option<JobPhase> {
        self.states
            .iter()
            .rev()
            .find(|s| s.job_id == job)
            .map(|s| s.state)
    }
}

pub struct Ctl {
    pub addr: SocketAddr,
    pub st: Arc<Mutex<CtlState>>,
    cut_gen: Arc<AtomicU64>,
}

impl Ctl {
    pub fn start(token: &str) -> Ctl {
        Ctl::start_with(token, None)
    }

    /// A `wss://` controller with this certificate chain and key (DER).
    pub fn start_tls(token: &str, cert: Vec<u8>, key: Vec<u8>) -> Ctl {
        use tokio_rustls::rustls;
        let cfg = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![rustls::pki_types::CertificateDer::from(cert)],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
            )
            .unwrap();
        Ctl::start_with(token, Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg))))
    }

    fn start_with(token: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Ctl {
        let st = Arc::new(Mutex::new(CtlState {
            token: token.into(),
            accept: true,
            feed_window: FEED_WINDOW,
            ..Default::default()
        }));
        let cut_gen = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let (st2, cut2) = (st.clone(), cut_gen.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(l.local_addr().unwrap()).unwrap();
                loop {
                    let Ok((s, _)) = l.accept().await else {
                        continue;
                    };
                    let (st, cut, tls) = (st2.clone(), cut2.clone(), tls.clone());
                    tokio::spawn(async move {
                        let r = match tls {
                            None => serve(s, st.clone(), cut).await,
                            Some(acc) => match acc.accept(s).await {
                                Ok(t) => serve(t, st.clone(), cut).await,
                                Err(e) => Err(format!("tls: {e}")),
                            },
                        };
                        if let Err(e) = r {
                            st.lock().unwrap().errors.push(e);
                        }
                        st.lock().unwrap().connected = false;
                    });
                }
            });
        });
        Ctl {
            addr: rx.recv().unwrap(),
            st,
            cut_gen,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/v1/agent", self.addr)
    }

    pub fn wss_url(&self) -> String {
        format!("wss://localhost:{}/v1/agent", self.addr.port())
    }

    /// Drop every open connection abruptly.
    pub fn cut(&self) {
        self.cut_gen.fetch_add(1, Ordering::SeqCst);
    }

    pub fn set_job(&self, job: JobSpec, trials: Vec<TrialSpec>) {
        let mut g = self.st.lock().unwrap();
        g.job = Some((job, trials));
        g.job_gen += 1;
    }

    pub fn with<R>(&self, f: impl FnOnce(&CtlState) -> R) -> R {
        f(&self.st.lock().unwrap())
    }

    pub fn records(&self) -> usize {
        self.with(|s| s.records.len())
    }
}

async fn serve<S>(s: S, st: Arc<Mutex<CtlState>>, cut: Arc<AtomicU64>) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let gen0 = cut.load(Ordering::SeqCst);
    let mut ws = tokio_tungstenite::accept_async(s)
        .await
        .map_err(|e| e.to_string())?;
    if !st.lock().unwrap().accept {
        return Ok(());
    }
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .map_err(|_| "no hello".to_string())?;
    let Some(Ok(Message::Binary(b))) = first else {
        return Err("first frame is not binary".into());
    };
    let AgentMsg::Hello(h) = AgentMsg::decode(&b).map_err(|e| e.to_string())? else {
        return Err("first frame is not Hello".into());
    };
    let accepted = {
        let mut g = st.lock().unwrap();
        g.hellos += 1;
        if h.token != g.token {
            None
        } else {
            g.connected = true;
            let finished = g.job.as_ref().is_some_and(|(j, _)| g.finished(j.job_id));
            Some((g.committed, if finished { None } else { g.job.clone() }))
        }
    };
    let Some((committed, mut job)) = accepted else {
        let m = ControllerMsg::Refused {
            reason: "bad token".into(),
        };
        let _ = ws.send(Message::Binary(m.encode().into())).await;
        return Ok(());
    };
    let welcome = ControllerMsg::Welcome(Welcome {
        proto_version: wire::PROTO_VERSION,
        features: wire::common_features(wire::features::ALL_V1, &h.features),
        heartbeat_ms: 300,
        committed_upto: committed,
    });
    let send = |m: ControllerMsg| Message::Binary(m.encode().into());
    ws.send(send(welcome)).await.map_err(|e| e.to_string())?;
    // Trials are fed in chunks as results come back (a bounded queue, as a scheduler
    // would), so the job is always mid-way when a test interrupts it. After a
    // reconnect everything without a record is re-sent; the agent drops what it holds.
    let mut fed = 0usize;
    let mut gen_seen = st.lock().unwrap().job_gen;
    let feed = |job: &Option<(JobSpec, Vec<TrialSpec>)>,
                fed: &mut usize,
                st: &CtlState|
     -> Vec<ControllerMsg> {
        let Some((spec, trials)) = job else {
            return vec![];
        };
        let per = spec.inputs.len().max(1);
        let done = st.per_job.get(&spec.job_id).copied().unwrap_or(0) / per;
        let mut out = Vec::new();
        if *fed == 0 {
            out.push(ControllerMsg::Job(spec.clone()));
            *fed = done.min(trials.len());
        }
        while *fed < trials.len() && *fed < done.saturating_add(st.feed_window) {
            let end = (*fed + FEED_CHUNK).min(trials.len());
            out.push(ControllerMsg::Trials(TrialChunk {
                job_id: spec.job_id,
                trials: trials[*fed..end].to_vec(),
                last: end == trials.len(),
            }));
            *fed = end;
        }
        out
    };
    let first_feed = feed(&job, &mut fed, &st.lock().unwrap());
    for m in first_feed {
        ws.send(send(m)).await.map_err(|e| e.to_string())?;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            m = ws.next() => {
                let b = match m {
                    None | Some(Err(_)) => return Ok(()),
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Close(_))) => return Ok(()),
                    Some(Ok(_)) => continue,
                };
                let msg = AgentMsg::decode(&b).map_err(|e| e.to_string())?;
                let reply = {
                    let mut g = st.lock().unwrap();
                    match msg {
                        AgentMsg::Heartbeat { seq, .. } => {
                            g.heartbeats += 1;
                            Some(ControllerMsg::HeartbeatAck { seq })
                        }
                        AgentMsg::Telemetry(_) => {
                            g.telemetry += 1;
                            None
                        }
                        AgentMsg::JobState(s) => {
                            g.states.push(s);
                            None
                        }
                        AgentMsg::Hello(_) => return Err("second Hello".into()),
                        AgentMsg::Records(batch) => {
                            for r in batch.records {
                                if r.seq <= g.committed {
                                    continue; // a resend of something committed
                                }
                                if r.seq != g.committed + 1 {
                                    let m = format!("gap: got seq {} after {}", r.seq, g.committed);
                                    g.gaps.push(m);
                                }
                                g.committed = r.seq;
                                *g.per_job.entry(r.job_id).or_default() += 1;
                                if g.keys.insert(r.key(), r.seq).is_some() {
                                    g.duplicate_keys.push(r.clone());
                                }
                                g.records.insert(r.seq, r);
                            }
                            Some(ControllerMsg::Ack { upto: g.committed })
                        }
                    }
                };
                if let Some(r) = reply {
                    ws.send(send(r)).await.map_err(|e| e.to_string())?;
                    let more = feed(&job, &mut fed, &st.lock().unwrap());
                    for m in more {
                        ws.send(send(m)).await.map_err(|e| e.to_string())?;
                    }
                }
            }
            _ = tick.tick() => {
                if cut.load(Ordering::SeqCst) != gen0 || !st.lock().unwrap().accept {
                    return Ok(()); // dropped without a close frame
                }
                let more = {
                    let g = st.lock().unwrap();
                    if g.job_gen != gen_seen {
                        gen_seen = g.job_gen;
                        job = g.job.clone();
                        fed = 0;
                    }
                    feed(&job, &mut fed, &g)
                };
                for m in more {
                    ws.send(send(m)).await.map_err(|e| e.to_string())?;
                }
            }
        }
    }
}

/// Trials per chunk, and how far ahead of the results the controller feeds.
pub const FEED_CHUNK: usize = 20;
pub const FEED_WINDOW: usize = 40;

pub fn job(job_id: u64, model: &str, inputs: Vec<u32>) -> JobSpec {
    JobSpec {
        job_id,
        campaign_id: 7,
        model: model.into(),
        inputs,
        mode: wire::JobMode::Inject,
        timeout_factor: 20.0,
        critical_iou: 0.5,
        golden_every: 100,
    }
}

/// `n` trials, each flipping one bit of a weight of `enc0.conv0.weight`.
pub fn flip_trials(n: u64, voltages: Vec<(String, u32)>) -> Vec<TrialSpec> {
    (0..n)
        .map(|i| TrialSpec {
            trial_id: i,
            attempt: 0,
            faults: vec![wire::FaultSpec {
                target: wire::FaultTarget::Tensor {
                    name: "enc0.conv0.weight".into(),
                    element: (i * 37) % 200,
                },
                bits: vec![(i % 8) as u8],
                kind: wire::FaultKind::BitFlip,
                persistence: wire::Persistence::Transient,
            }],
            voltages: voltages.clone(),
        })
        .collect()
}
