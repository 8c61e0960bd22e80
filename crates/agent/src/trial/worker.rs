//! The trial loop: a dedicated thread that owns the board. It receives jobs, trial
//! chunks and link events from the websocket task, runs trials in order, and commits
//! records plus job progress to the spool in fsynced batches.
//!
//! Job state on disk (`<state_dir>/job/`): `spec.json`, `trials.log` (the chunks as
//! received, CRC-framed), `final.json` once the job ended, `inflight` (the trial being
//! run and the board's boot id, to tell a board crash from an agent restart).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::wire::{
    AgentMsg, JobMode, JobPhase, JobSpec, JobState, Outcome, Record, TrialChunk, TrialSpec,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::board::Board;
use crate::config::Config;
use crate::link::spool::{Progress, Spool};
use crate::safety;
use crate::trial::engine::{Engine, PrepareError};

/// Link -> worker.
#[derive(Debug)]
pub enum Cmd {
    Job(JobSpec),
    Trials(TrialChunk),
    Cancel(u64),
    /// The controller committed records up to this seq.
    Acked(u64),
    /// Controller lost beyond the grace period: restore nominal and wait.
    Pause,
    Resume,
    Shutdown,
}

/// State the link reads when it (re)connects.
#[derive(Debug, Default)]
pub struct Shared {
    pub active_job: Mutex<Option<u64>>,
    pub final_state: Mutex<Option<JobState>>,
    pub paused: AtomicBool,
}

#[derive(Debug, Serialize, Deserialize)]
struct FinalFile {
    state: JobState,
    last_seq: u64,
}

struct ActiveJob {
    spec: JobSpec,
    trials: Vec<TrialSpec>,
    held: HashSet<(u64, u32)>,
    last_seen: bool,
    next: u64,
    engine: Option<Engine>,
    final_state: Option<(JobState, u64)>,
    since_golden: u32,
    next_round_at: Instant,
}

pub struct Worker {
    cfg: Config,
    spool: Arc<Mutex<Spool>>,
    out: tokio::sync::mpsc::UnboundedSender<AgentMsg>,
    shared: Arc<Shared>,
    board: Option<Board>,
    job: Option<ActiveJob>,
    pending: Vec<Record>,
    pending_progress: Option<Progress>,
    last_commit: Instant,
    paused: bool,
    shutdown: bool,
    job_dir: PathBuf,
    inflight: Option<File>,
    panic_at: Option<u64>,
    /// Boot id seen when this process first reached the board.
    boot_id: String,
    cmds: Option<Receiver<Cmd>>,
    writer: SpoolWriter,
}

enum WriteReq {
    Batch(Option<Progress>, Vec<Record>),
    Barrier(std::sync::mpsc::SyncSender<()>),
}

/// The spool's fsyncs run on their own thread so the trial loop does not wait for the
/// disk; batches that queue up meanwhile share one fsync. Durability is unchanged:
/// records become visible to the link only once written and synced.
struct SpoolWriter {
    tx: std::sync::mpsc::Sender<WriteReq>,
}

impl SpoolWriter {
    fn start(spool: Arc<Mutex<Spool>>, wake: Arc<Notify>) -> SpoolWriter {
        let (tx, rx) = std::sync::mpsc::channel::<WriteReq>();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut reqs = vec![first];
                    while let Ok(r) = rx.try_recv() {
                        reqs.push(r);
                    }
                    let mut records = Vec::new();
                    let mut progress = None;
                    let mut barriers = Vec::new();
                    for r in reqs {
                        match r {
                            WriteReq::Batch(p, recs) => {
                                records.extend(recs);
                                progress = p.or(progress);
                            }
                            WriteReq::Barrier(b) => barriers.push(b),
                        }
                    }
                    if !records.is_empty() || progress.is_some() {
                        // Never drop records: retry until the disk takes them.
                        loop {
                            let r = lock(&spool).append(progress, records.clone());
                            match r {
                                Ok(_) => break,
                                Err(e) => {
                                    tracing::error!(error = %e, "Spool append failed; retrying");
                                    std::thread::sleep(Duration::from_millis(200));
                                }
                            }
                        }
                        wake.notify_one();
                    }
                    for b in barriers {
                        let _ = b.send(());
                    }
                }
            })
            .expect("spawning the spool writer");
        SpoolWriter { tx }
    }

    fn write(&self, progress: Option<Progress>, records: Vec<Record>) {
        let _ = self.tx.send(WriteReq::Batch(progress, records));
    }

    /// Wait until everything handed over so far is durable.
    fn barrier(&self) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if self.tx.send(WriteReq::Barrier(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 8);
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

fn read_frames(path: &Path) -> Vec<Vec<u8>> {
    let mut data = Vec::new();
    if File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .is_err()
    {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut off = 0;
    while data.len() - off >= 8 {
        let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(data[off + 4..off + 8].try_into().unwrap_or_default());
        if data.len() - off - 8 < len {
            break;
        }
        let p = &data[off + 8..off + 8 + len];
        if crc32fast::hash(p) != crc {
            break;
        }
        out.push(p.to_vec());
        off += 8 + len;
    }
    out
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(d) = path.parent() {
        File::open(d)?.sync_all()?;
    }
    Ok(())
}

/// Golden re-check at nominal voltage: every rail is walked (in its usual steps) to
/// nominal, the goldens re-run, then each rail walked back to its previous set-point so
/// the following trials inherit what they would have without the re-check.
fn golden_recheck_at_nominal(
    engine: &mut Engine,
    board: &mut Board,
) -> Result<Option<String>, PrepareError> {
    let mut back = Vec::new();
    for h in board.rails.iter_mut() {
        let was = h
            .reg
            .read_mv()
            .map_err(|e| PrepareError::Failed(format!("{}: {e}", h.cfg.name)))?;
        let nominal = h.cfg.nominal_mv;
        if (was - nominal as f32).abs() < 0.5 {
            continue;
        }
        safety::walk(h, Some(&mut board.sensors), nominal, false)
            .map_err(|e| PrepareError::Failed(e.to_string()))?;
        back.push((h.cfg.name.clone(), was.round() as u32));
    }
    let verdict = engine.golden_recheck(board)?;
    for (rail, mv) in back {
        if let Some(h) = board.rails.iter_mut().find(|r| r.cfg.name == rail) {
            safety::walk(h, Some(&mut board.sensors), mv, true)
                .map_err(|e| PrepareError::Failed(e.to_string()))?;
        }
    }
    Ok(verdict)
}

impl Worker {
    pub fn new(
        cfg: Config,
        spool: Arc<Mutex<Spool>>,
        wake: Arc<Notify>,
        out: tokio::sync::mpsc::UnboundedSender<AgentMsg>,
        shared: Arc<Shared>,
    ) -> Worker {
        let job_dir = cfg.state_dir.join("job");
        let panic_at = std::env::var("HIL_AGENT_TEST_PANIC_AT_TRIAL")
            .ok()
            .and_then(|v| v.parse().ok());
        let writer = SpoolWriter::start(spool.clone(), wake.clone());
        Worker {
            cfg,
            spool,
            out,
            shared,
            board: None,
            job: None,
            pending: Vec::new(),
            pending_progress: None,
            last_commit: Instant::now(),
            paused: false,
            shutdown: false,
            job_dir,
            inflight: None,
            panic_at,
            boot_id: String::new(),
            cmds: None,
            writer,
        }
    }

    fn send_state(&self, job_id: u64, state: JobPhase, detail: Option<String>) {
        let _ = self.out.send(AgentMsg::JobState(JobState {
            job_id,
            state,
            detail,
        }));
    }

    /// Reload a job in progress from disk (after an agent restart).
    fn load_job(&mut self) {
        let Ok(text) = std::fs::read(self.job_dir.join("spec.json")) else {
            return;
        };
        let spec: JobSpec = match serde_json::from_slice(&text) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "Stored job spec unreadable; dropping the job");
                let _ = std::fs::remove_dir_all(&self.job_dir);
                return;
            }
        };
        let mut job = ActiveJob {
            spec,
            trials: Vec::new(),
            held: HashSet::new(),
            last_seen: false,
            next: 0,
            engine: None,
            final_state: None,
            since_golden: 0,
            next_round_at: Instant::now(),
        };
        for p in read_frames(&self.job_dir.join("trials.log")) {
            if let Ok(chunk) = postcard::from_bytes::<TrialChunk>(&p) {
                for t in chunk.trials {
                    if job.held.insert((t.trial_id, t.attempt)) {
                        job.trials.push(t);
                    }
                }
                job.last_seen |= chunk.last;
            }
        }
        if let Some(p) = lock(&self.spool).progress()
            && p.job_id == job.spec.job_id
        {
            job.next = p.next_trial;
        }
        if let Ok(b) = std::fs::read(self.job_dir.join("final.json"))
            && let Ok(f) = serde_json::from_slice::<FinalFile>(&b)
        {
            job.final_state = Some((f.state.clone(), f.last_seq));
            *lock(&self.shared.final_state) = Some(f.state);
        }
        tracing::info!(
            job_id = job.spec.job_id,
            next_trial = job.next,
            trials = job.trials.len(),
            "Resuming job"
        );
        *lock(&self.shared.active_job) = Some(job.spec.job_id);
        self.job = Some(job);
    }

    fn ensure_board(&mut self) -> bool {
        if self.board.is_some() {
            return true;
        }
        match Board::open(&self.cfg.board_file, &self.cfg.hw_root) {
            Ok(b) => {
                self.board = Some(b);
                if self.boot_id.is_empty() {
                    self.boot_id = self.cfg.boot_id();
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "Board not available");
                false
            }
        }
    }

    /// Hand finished trials' records (and the progress after them) to the spool writer.
    /// `force`: now, and wait until they are durable.
    fn commit(&mut self, force: bool) {
        if self.pending.is_empty() && self.pending_progress.is_none() {
            if force {
                self.writer.barrier();
            }
            return;
        }
        if !force
            && self.last_commit.elapsed() < Duration::from_millis(self.cfg.commit_interval_ms)
            && self.pending.len() < 256
        {
            return;
        }
        let records = std::mem::take(&mut self.pending);
        let progress = self.pending_progress.take();
        self.writer.write(progress, records);
        if force {
            self.writer.barrier();
        }
        self.last_commit = Instant::now();
    }

    fn restore_nominal(&mut self) {
        if let Some(b) = self.board.as_mut() {
            for h in b.rails.iter_mut() {
                let nominal = h.cfg.nominal_mv;
                if let Err(e) = safety::walk(h, None, nominal, false) {
                    tracing::error!(rail = %h.cfg.name, error = %e, "Could not restore nominal voltage");
                }
            }
        } else {
            let r = match proto::board::BoardFile::load(&self.cfg.board_file) {
                Ok(f) => safety::Restorer::new(f, &self.cfg.hw_root),
                Err(_) => return,
            };
            for (rail, e) in r.restore_nominal() {
                tracing::error!(rail = %rail, error = %e, "Could not restore nominal voltage");
            }
        }
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Shutdown => self.shutdown = true,
            Cmd::Pause => {
                if !self.paused {
                    tracing::warn!(
                        "Controller lost: pausing the job and restoring nominal voltages"
                    );
                    self.paused = true;
                    self.shared.paused.store(true, Ordering::SeqCst);
                    self.commit(true);
                    self.restore_nominal();
                }
            }
            Cmd::Resume => {
                if self.paused {
                    tracing::info!("Controller back: resuming");
                }
                self.paused = false;
                self.shared.paused.store(false, Ordering::SeqCst);
            }
            Cmd::Acked(upto) => {
                let clear = self
                    .job
                    .as_ref()
                    .and_then(|j| j.final_state.as_ref())
                    .is_some_and(|(_, last)| upto >= *last);
                if clear {
                    let id = self.job.as_ref().map(|j| j.spec.job_id);
                    tracing::info!(job_id = ?id, "Job fully acknowledged; clearing it");
                    self.job = None;
                    let _ = std::fs::remove_dir_all(&self.job_dir);
                    *lock(&self.shared.active_job) = None;
                    *lock(&self.shared.final_state) = None;
                }
            }
            Cmd::Cancel(id) => {
                if self
                    .job
                    .as_ref()
                    .is_some_and(|j| j.spec.job_id == id && j.final_state.is_none())
                {
                    self.finish(JobPhase::Cancelled, None);
                }
            }
            Cmd::Job(spec) => {
                if let Some(j) = &self.job {
                    if j.spec.job_id != spec.job_id {
                        self.send_state(
                            spec.job_id,
                            JobPhase::Failed,
                            Some(format!("agent is busy with job {}", j.spec.job_id)),
                        );
                    }
                    return;
                }
                let _ = std::fs::remove_dir_all(&self.job_dir);
                let stored = std::fs::create_dir_all(&self.job_dir).and_then(|_| {
                    write_atomic(
                        &self.job_dir.join("spec.json"),
                        &serde_json::to_vec(&spec).unwrap_or_default(),
                    )
                });
                if let Err(e) = stored {
                    self.send_state(
                        spec.job_id,
                        JobPhase::Failed,
                        Some(format!("cannot store the job: {e}")),
                    );
                    return;
                }
                tracing::info!(job_id = spec.job_id, model = %spec.model, "New job");
                *lock(&self.shared.active_job) = Some(spec.job_id);
                self.job = Some(ActiveJob {
                    spec,
                    trials: Vec::new(),
                    held: HashSet::new(),
                    last_seen: false,
                    next: 0,
                    engine: None,
                    final_state: None,
                    since_golden: 0,
                    next_round_at: Instant::now(),
                });
            }
            Cmd::Trials(mut chunk) => {
                let Some(j) = self.job.as_mut() else {
                    self.send_state(
                        chunk.job_id,
                        JobPhase::Failed,
                        Some("no such job on this agent".into()),
                    );
                    return;
                };
                if j.spec.job_id != chunk.job_id {
                    let busy = j.spec.job_id;
                    self.send_state(
                        chunk.job_id,
                        JobPhase::Failed,
                        Some(format!("agent is busy with job {busy}")),
                    );
                    return;
                }
                chunk
                    .trials
                    .retain(|t| !j.held.contains(&(t.trial_id, t.attempt)));
                if chunk.trials.is_empty() && (!chunk.last || j.last_seen) {
                    return;
                }
                let bytes = frame(&postcard::to_stdvec(&chunk).unwrap_or_default());
                let path = self.job_dir.join("trials.log");
                let w = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(&bytes).and_then(|_| f.sync_data()));
                if let Err(e) = w {
                    tracing::error!(error = %e, "Cannot persist a trial chunk; it will be re-sent");
                    return;
                }
                for t in chunk.trials {
                    j.held.insert((t.trial_id, t.attempt));
                    j.trials.push(t);
                }
                j.last_seen |= chunk.last;
            }
        }
    }

    fn finish(&mut self, phase: JobPhase, detail: Option<String>) {
        self.commit(true);
        if let (Some(j), Some(b)) = (self.job.as_mut(), self.board.as_mut())
            && let Some(e) = j.engine.as_mut()
            && e.injector.permanent_faults() > 0
            && let Err(err) = e.injector.rewrite_pristine(b)
        {
            tracing::error!(error = %err, "Could not rewrite pristine parameters");
        }
        self.restore_nominal();
        let Some(j) = self.job.as_mut() else { return };
        let state = JobState {
            job_id: j.spec.job_id,
            state: phase,
            detail,
        };
        let last_seq = lock(&self.spool).head();
        let f = FinalFile {
            state: state.clone(),
            last_seq,
        };
        if let Err(e) = write_atomic(
            &self.job_dir.join("final.json"),
            &serde_json::to_vec(&f).unwrap_or_default(),
        ) {
            tracing::error!(error = %e, "Cannot store the job's final state");
        }
        tracing::info!(job_id = j.spec.job_id, state = ?state.state, "Job ended");
        j.final_state = Some((state.clone(), last_seq));
        j.engine = None;
        *lock(&self.shared.final_state) = Some(state.clone());
        let _ = self.out.send(AgentMsg::JobState(state));
        // Already acked (no records)? Clear at once.
        let acked = lock(&self.spool).acked_upto();
        self.handle(Cmd::Acked(acked));
    }

    fn read_inflight(&self) -> Option<(u64, u64, String)> {
        let s = std::fs::read_to_string(self.job_dir.join("inflight")).ok()?;
        let mut it = s.split_whitespace();
        Some((
            it.next()?.parse().ok()?,
            it.next()?.parse().ok()?,
            it.next().unwrap_or("").to_string(),
        ))
    }

    /// Prepare the engine (golden pass). Returns false if the board is not there.
    fn prepare(&mut self) -> bool {
        if !self.ensure_board() {
            return false;
        }
        let board = self.board.as_mut().expect("ensured");
        let j = self.job.as_mut().expect("caller checked");
        let spec = j.spec.clone();
        let _ = self.out.send(AgentMsg::JobState(JobState {
            job_id: spec.job_id,
            state: JobPhase::Started,
            detail: None,
        }));
        match Engine::prepare(board, &self.cfg.models_dir, &spec) {
            Ok(e) => {
                let _ = self.out.send(AgentMsg::JobState(JobState {
                    job_id: spec.job_id,
                    state: JobPhase::GoldenReady {
                        p99_ns: e.p99.as_nanos() as u64,
                        timeout_ns: e.timeout.as_nanos() as u64,
                    },
                    detail: None,
                }));
                tracing::info!(job_id = spec.job_id, p99 = ?e.p99, timeout = ?e.timeout, "Golden ready");
                j.engine = Some(e);
                self.recover_inflight();
                true
            }
            Err(PrepareError::Unreachable(m)) => {
                tracing::warn!(error = %m, "Board unreachable while preparing");
                self.board = None;
                false
            }
            Err(PrepareError::Failed(why)) => {
                tracing::error!(job_id = spec.job_id, reason = %why, "Job refused");
                self.refuse_held(&why);
                self.finish(JobPhase::Failed, Some(why));
                true
            }
        }
    }

    /// A trial marked in flight but not committed: a board crash if the board has
    /// rebooted since (new boot id), otherwise it is simply run again.
    fn recover_inflight(&mut self) {
        let Some((job_id, idx, boot)) = self.read_inflight() else {
            return;
        };
        let Some(j) = self.job.as_mut() else { return };
        if job_id != j.spec.job_id || idx != j.next || idx as usize >= j.trials.len() {
            return;
        }
        if boot.is_empty() || boot == self.boot_id {
            return;
        }
        let spec = j.trials[idx as usize].clone();
        let Some(e) = j.engine.as_ref() else { return };
        tracing::warn!(
            trial = spec.trial_id,
            "Board rebooted during a trial: reporting a crash"
        );
        let recs = e.uniform(
            &spec,
            Outcome::Crash,
            "board rebooted during the trial (boot id changed)",
        );
        j.next += 1;
        self.pending.extend(recs);
        self.pending_progress = Some(Progress {
            job_id,
            next_trial: idx + 1,
        });
        self.commit(true);
    }

    /// Refusal records for every held trial not yet run (job-level refusal).
    fn refuse_held(&mut self, why: &str) {
        let Some(j) = self.job.as_mut() else { return };
        let n = j.spec.inputs.len();
        for t in &j.trials[j.next as usize..] {
            for k in 0..n {
                let now = crate::trial::engine::unix_ns();
                self.pending.push(Record {
                    job_id: j.spec.job_id,
                    campaign_id: j.spec.campaign_id,
                    trial_id: t.trial_id,
                    attempt: t.attempt,
                    input: j.spec.inputs[k],
                    start_unix_ns: now,
                    end_unix_ns: now,
                    ..Record::unmeasured(Outcome::Refused, why.chars().take(512).collect())
                });
            }
        }
        j.next = j.trials.len() as u64;
        self.pending_progress = Some(Progress {
            job_id: j.spec.job_id,
            next_trial: j.next,
        });
    }

    /// Wait for a crashed board to come back, then re-prepare and compare goldens.
    fn recover_board(&mut self) {
        self.board = None;
        let old_golden: Vec<Vec<u8>> = self
            .job
            .as_ref()
            .and_then(|j| j.engine.as_ref())
            .map(|e| e.inputs.iter().map(|i| i.golden.clone()).collect())
            .unwrap_or_default();
        if let Some(j) = self.job.as_mut() {
            j.engine = None;
        }
        tracing::warn!(
            "Board crashed or accelerator wedged; waiting for a usable board (power cycle)"
        );
        self.wait_board();
        if self.shutdown || self.board.is_none() {
            return;
        }
        if self.job.as_ref().is_some_and(|j| j.final_state.is_none()) && self.prepare() {
            let drift = self
                .job
                .as_ref()
                .and_then(|j| j.engine.as_ref())
                .map(|e| {
                    e.inputs
                        .iter()
                        .zip(&old_golden)
                        .any(|(i, g)| i.golden != *g)
                })
                .unwrap_or(false);
            if drift {
                self.finish(
                    JobPhase::Suspect,
                    Some("golden output changed across a board crash".into()),
                );
            }
        }
    }

    /// Poll until the board answers (regulators and accelerator ID), or shutdown.
    fn wait_board(&mut self) {
        loop {
            if let Some(cmd) = self.try_cmd(Duration::from_millis(500)) {
                self.handle(cmd);
            }
            if self.shutdown {
                return;
            }
            if !self.ensure_board() {
                continue;
            }
            let b = self.board.as_mut().expect("ensured");
            let rails_ok = b.rails.iter_mut().all(|h| h.reg.read_mv().is_ok());
            let a = &b.file.accelerator;
            let id_ok = b
                .window(&a.region)
                .and_then(|w| w.read32(a.regs.id).ok())
                .is_some_and(|id| id == a.id);
            let idle = b
                .window(&a.region)
                .and_then(|w| w.read32(crate::driver::AP_CTRL).ok())
                .is_some_and(|c| c & crate::driver::AP_IDLE != 0);
            if rails_ok && id_ok && idle {
                self.boot_id = self.cfg.boot_id();
                tracing::info!("Board is back");
                return;
            }
            self.board = None;
        }
    }

    fn try_cmd(&self, t: Duration) -> Option<Cmd> {
        match self.cmds.as_ref()?.recv_timeout(t) {
            Ok(c) => Some(c),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(Cmd::Shutdown),
        }
    }

    /// One unit of work; returns how long the loop may block waiting for a command.
    fn step(&mut self) -> Duration {
        let idle = Duration::from_millis(self.cfg.commit_interval_ms.max(1));
        if self.paused || lock(&self.spool).is_full() {
            self.commit(true);
            return Duration::from_millis(100);
        }
        let Some(j) = self.job.as_ref() else {
            return Duration::from_secs(1);
        };
        if j.final_state.is_some() {
            return Duration::from_secs(1);
        }
        if j.engine.is_none() {
            // An injection job prepares once its first trials are held, so that a
            // job-level refusal (wrong accelerator ID, ...) becomes refusal records
            // for them instead of racing the first chunk.
            if matches!(j.spec.mode, JobMode::Inject) && j.trials.is_empty() && !j.last_seen {
                return idle;
            }
            if !self.prepare() {
                return Duration::from_secs(1);
            }
            return Duration::ZERO;
        }
        let mode = j.spec.mode.clone();
        match mode {
            JobMode::Inject => {
                let j = self.job.as_ref().expect("checked");
                if (j.next as usize) < j.trials.len() {
                    self.run_one();
                    Duration::ZERO
                } else if j.last_seen {
                    self.finish(JobPhase::Finished, None);
                    Duration::ZERO
                } else {
                    self.commit(true);
                    idle
                }
            }
            JobMode::Field { period_ms, rounds } => {
                let j = self.job.as_mut().expect("checked");
                if rounds.is_some_and(|r| j.next >= u64::from(r)) {
                    self.finish(JobPhase::Finished, None);
                    return Duration::ZERO;
                }
                let now = Instant::now();
                if now < j.next_round_at {
                    let wait = (j.next_round_at - now).min(Duration::from_millis(200));
                    self.commit(true);
                    return wait;
                }
                j.next_round_at = now + Duration::from_millis(u64::from(period_ms));
                let spec = TrialSpec {
                    trial_id: j.next,
                    attempt: 0,
                    faults: vec![],
                    voltages: vec![],
                };
                self.run_spec(spec);
                self.commit(true);
                Duration::ZERO
            }
            JobMode::Health => {
                let j = self.job.as_ref().expect("checked");
                if j.next == 0 {
                    let spec = TrialSpec {
                        trial_id: 0,
                        attempt: 0,
                        faults: vec![],
                        voltages: vec![],
                    };
                    self.run_spec(spec);
                }
                self.finish(JobPhase::Finished, None);
                Duration::ZERO
            }
        }
    }

    fn run_one(&mut self) {
        if let Some(b) = self.board.as_mut() {
            let t = b.sensors.max_temp_c();
            let limit = b.file.sensors.max_temp_c;
            if t > limit {
                let why = format!(
                    "die temperature {t:.1} °C is above the board limit {limit:.1} °C: job stopped"
                );
                tracing::error!(reason = %why, "Thermal interlock");
                self.finish(JobPhase::Failed, Some(why));
                return;
            }
        }
        let j = self.job.as_ref().expect("caller checked");
        let spec = j.trials[j.next as usize].clone();
        self.run_spec(spec);
    }

    fn run_spec(&mut self, spec: TrialSpec) {
        let board = self.board.as_mut().expect("prepared");
        let j = self.job.as_mut().expect("caller checked");
        let idx = j.next;
        let job_id = j.spec.job_id;
        let risky = spec
            .voltages
            .iter()
            .any(|(r, mv)| board.file.rail(r).is_some_and(|c| *mv < c.nominal_mv));
        let _span = tracing::debug_span!(
            "trial",
            job_id,
            campaign_id = j.spec.campaign_id,
            trial_id = spec.trial_id
        )
        .entered();
        if risky {
            // Records of earlier trials must be durable before a trial that may crash
            // the board.
            self.commit(true);
        }
        let board = self.board.as_mut().expect("prepared");
        let j = self.job.as_mut().expect("caller checked");
        let mut line = format!("{job_id} {idx} {}", self.boot_id).into_bytes();
        line.resize(128, b' ');
        if self.inflight.is_none() {
            self.inflight = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(self.job_dir.join("inflight"))
                .ok();
        }
        if let Some(f) = &self.inflight {
            let _ = f.write_at(&line, 0);
            if risky {
                let _ = f.sync_data();
            }
        }
        if self.panic_at == Some(idx) {
            for (rail, mv) in &spec.voltages {
                if let Some(h) = board.rails.iter_mut().find(|r| r.cfg.name == *rail) {
                    let _ = safety::walk(h, None, *mv, true);
                }
            }
            panic!("test-only panic at trial index {idx} (HIL_AGENT_TEST_PANIC_AT_TRIAL)");
        }
        let engine = j.engine.as_mut().expect("prepared");
        let run = engine.run_trial(board, &spec);
        j.next += 1;
        j.since_golden += 1;
        self.pending.extend(run.records);
        self.pending_progress = Some(Progress {
            job_id,
            next_trial: j.next,
        });
        if run.crashed || run.wedged {
            // A wedged accelerator (hang below Vhang) or a dead board needs a power cycle,
            // which is the controller's job; wait for a usable board, then re-check.
            self.commit(true);
            self.recover_board();
            return;
        }
        if let Some(why) = run.suspect {
            tracing::error!(reason = %why, "Board suspect");
            self.finish(JobPhase::Suspect, Some(why));
            return;
        }
        let every = j.spec.golden_every;
        if every > 0 && j.since_golden >= every {
            j.since_golden = 0;
            // The re-check asks whether the board is healthy, so it runs at nominal: at an
            // undervolted set-point upsets are expected and would make a good board
            // "suspect". Afterwards the rails go back to where the trials had them.
            match golden_recheck_at_nominal(engine, board) {
                Ok(None) => {}
                Ok(Some(why)) => {
                    self.finish(JobPhase::Suspect, Some(why));
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "Golden re-check failed"),
            }
        }
        self.commit(false);
    }

    pub fn run(mut self, cmds: Receiver<Cmd>) {
        self.cmds = Some(cmds);
        self.load_job();
        let mut wait = Duration::ZERO;
        loop {
            // Drain commands; block only when there is nothing to do.
            let first = if wait.is_zero() {
                self.cmds.as_ref().and_then(|c| c.try_recv().ok())
            } else {
                self.try_cmd(wait)
            };
            if let Some(c) = first {
                self.handle(c);
                while let Some(c) = self.cmds.as_ref().and_then(|c| c.try_recv().ok()) {
                    self.handle(c);
                }
            }
            if self.shutdown {
                break;
            }
            self.commit(false);
            wait = self.step();
        }
        self.commit(true);
        self.restore_nominal();
        tracing::info!("Trial loop stopped; nominal voltages restored");
    }
}
