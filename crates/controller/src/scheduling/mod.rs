//! Scheduling: health checks, chunk dispatch, reassignment and retries.
//!
//! All mutable lab state sits in one [`Lab`] behind a mutex; every handler takes it,
//! updates it and sends frames through the boards' session channels (non-blocking), so
//! there is exactly one order of events. Durable effects go through the store writer,
//! which keeps FIFO order with record ingestion.
//!
//! Leases: a board running a job holds the trials sent to it (`outstanding`). A short
//! disconnect keeps the lease (the agent resumes its job and re-sends its spool); a
//! lost board's trials go back to the queue with the *same* attempt number, so a late
//! copy of a result lands on the same key and is dropped by the store. Only the trial
//! that was in flight when a board died is held back: it becomes a `crash` outcome.

pub mod trial;

use crate::campaign::{Injection, Plan, Stratum};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::{Board, Health, SchedState, Session};
use crate::store::{Store, now_ms};
use proto::wire::{
    ControllerMsg, JobMode, JobPhase, JobSpec, JobState, Outcome, Record, TrialChunk, TrialSpec,
};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;
use trial::TrialStatus;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Queued,
    Running,
    Paused,
    Done,
    Cancelled,
    TimedOut,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Done => "done",
            RunState::Cancelled => "cancelled",
            RunState::TimedOut => "timed_out",
        }
    }
    pub fn parse(s: &str) -> RunState {
        match s {
            "running" => RunState::Running,
            "paused" => RunState::Paused,
            "done" => RunState::Done,
            "cancelled" => RunState::Cancelled,
            "timed_out" => RunState::TimedOut,
            _ => RunState::Queued,
        }
    }
    pub fn finished(self) -> bool {
        matches!(
            self,
            RunState::Done | RunState::Cancelled | RunState::TimedOut
        )
    }
}

#[derive(Debug, Default)]
struct Trial {
    attempt: u32,
    recs: Vec<(u32, u32, Outcome)>,
    fin: Option<Outcome>,
    queued: bool,
}

pub struct Run {
    pub id: u64,
    pub plan: Plan,
    pub state: RunState,
    pub strata: Vec<Stratum>,
    injections: Arc<Vec<Injection>>,
    trials: Vec<Trial>,
    /// Per model, trials waiting for a board (list order, retries in front).
    pending: BTreeMap<String, VecDeque<u64>>,
    /// Per stratum: its trial ids in list order, the finished-prefix pointer, and the
    /// early-stop point once reached.
    strata_trials: Vec<Vec<u64>>,
    stopped: Vec<Option<u64>>,
    pub done: u64,
    pub outcomes: BTreeMap<&'static str, u64>,
    pub started_ms: Option<u64>,
}

impl Run {
    pub fn total(&self) -> u64 {
        self.injections.len() as u64
    }

    /// Trials still needed (early-stopped strata need none).
    pub fn needed(&self) -> u64 {
        let mut n = 0;
        for (s, ids) in self.strata_trials.iter().enumerate() {
            if self.stopped[s].is_some() {
                continue;
            }
            n += ids
                .iter()
                .filter(|t| self.trials[**t as usize].fin.is_none())
                .count() as u64;
        }
        n
    }

    fn stratum_stopped(&self, trial: u64) -> bool {
        let s = self.injections[trial as usize].stratum as usize;
        self.stopped.get(s).copied().flatten().is_some()
    }

    pub fn progress(&self) -> (u64, u64) {
        let planned: u64 = self
            .strata_trials
            .iter()
            .enumerate()
            .map(|(s, ids)| self.stopped[s].unwrap_or(ids.len() as u64))
            .sum();
        let needed = self.needed();
        (planned.saturating_sub(needed), planned)
    }
}

pub struct Lease {
    pub campaign: u64,
    pub job_id: u64,
    pub model: String,
    /// Sent and not yet final, in dispatch order.
    pub outstanding: Vec<u64>,
    pub last_sent: bool,
    pub timeout_ns: Option<u64>,
    pub last_progress_ms: u64,
    /// Trial held back while the board recovers (it was in flight when the board died).
    pub held: Option<u64>,
}

pub struct HealthWait {
    pub board: String,
    pub mismatch: bool,
    pub tx: Option<oneshot::Sender<bool>>,
}

#[derive(Default)]
pub struct Lab {
    pub boards: BTreeMap<String, Board>,
    pub runs: BTreeMap<u64, Run>,
    pub leases: HashMap<String, Lease>,
    pub health_jobs: HashMap<u64, HealthWait>,
    /// board -> job we asked to cancel, with a waiter.
    pub cancels: HashMap<String, (u64, Vec<oneshot::Sender<()>>)>,
    pub recovering: std::collections::HashSet<String>,
    /// board -> job ids of field-mode jobs (canary accounting).
    pub field_jobs: HashMap<u64, String>,
}

pub struct Shared {
    pub cfg: Config,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    lab: Mutex<Lab>,
    job_seq: AtomicU64,
    pub session_seq: AtomicU64,
    pub consoles: crate::recovery::console::Consoles,
}

impl Shared {
    pub fn new(
        cfg: Config,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Shared>, crate::store::StoreError> {
        let mut lab = Lab::default();
        let stored = store.boards_blocking()?;
        for b in &cfg.boards {
            lab.boards
                .insert(b.id.clone(), Board::new(&b.id, b.labels.clone()));
        }
        for id in cfg.tokens.boards.keys() {
            lab.boards
                .entry(id.clone())
                .or_insert_with(|| Board::new(id, BTreeMap::new()));
        }
        for row in stored {
            let b = lab
                .boards
                .entry(row.id.clone())
                .or_insert_with(|| Board::new(&row.id, BTreeMap::new()));
            b.committed_upto = row.committed_upto;
            b.health = Health::parse(&row.health).unwrap_or(Health::Unknown);
            b.health_reason = row.health_reason;
            b.failed_recoveries = row.failed_recoveries;
            if b.health == Health::Bad {
                metrics.board_bad_alert.with_label_values(&[&b.id]).set(1);
            }
        }
        // Rebuild every unfinished campaign from the store: the list and the results
        // are the whole truth, nothing else was kept.
        for row in store.campaigns_blocking()? {
            let state = RunState::parse(&row.state);
            if state.finished() {
                continue;
            }
            let injections = store.injections_blocking(row.id)?;
            let strata = store.strata_blocking(row.id)?;
            let mut run = new_run(row.id, row.plan, state, strata, injections);
            run.started_ms = row.started_ms;
            for (t, a) in store.attempts_blocking(row.id)? {
                if let Some(tr) = run.trials.get_mut(t as usize) {
                    tr.attempt = tr.attempt.max(a);
                }
            }
            let recs = store.outcomes_blocking(row.id)?;
            let mut dummy = Vec::new();
            for (t, a, i, o) in recs {
                apply_record(&mut run, &cfg, &metrics, t, a, i, o, &mut dummy, false);
            }
            rebuild_pending(&mut run);
            tracing::info!(
                campaign = row.id,
                done = run.done,
                total = run.total(),
                "campaign resumed from store"
            );
            lab.runs.insert(row.id, run);
        }
        // Job ids must not collide with those of an earlier run of the controller that
        // agents may still hold: derive them from the start time.
        let base = now_ms() << 10;
        Ok(Arc::new(Shared {
            cfg,
            store,
            metrics,
            lab: Mutex::new(lab),
            job_seq: AtomicU64::new(base),
            session_seq: AtomicU64::new(1),
            consoles: Default::default(),
        }))
    }

    pub fn lab(&self) -> MutexGuard<'_, Lab> {
        self.lab.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn next_job_id(&self) -> u64 {
        self.job_seq.fetch_add(1, Ordering::Relaxed)
    }
}

fn new_run(
    id: u64,
    plan: Plan,
    state: RunState,
    strata: Vec<Stratum>,
    injections: Vec<Injection>,
) -> Run {
    let mut strata_trials = vec![Vec::new(); strata.len()];
    for i in &injections {
        if let Some(v) = strata_trials.get_mut(i.stratum as usize) {
            v.push(i.trial_id);
        }
    }
    let trials = (0..injections.len()).map(|_| Trial::default()).collect();
    let mut run = Run {
        id,
        plan,
        state,
        stopped: vec![None; strata.len()],
        strata,
        injections: Arc::new(injections),
        trials,
        pending: BTreeMap::new(),
        strata_trials,
        done: 0,
        outcomes: BTreeMap::new(),
        started_ms: None,
    };
    rebuild_pending(&mut run);
    run
}

fn rebuild_pending(run: &mut Run) {
    run.pending.clear();
    for inj in run.injections.iter() {
        let t = &mut run.trials[inj.trial_id as usize];
        t.queued = false;
        if t.fin.is_none() {
            t.queued = true;
            run.pending
                .entry(inj.model.clone())
                .or_default()
                .push_back(inj.trial_id);
        }
    }
}

/// Folds one new record into a run. Returns whether the trial changed state; trials
/// that need re-dispatch are pushed to `retry` as (trial, attempt).
#[allow(clippy::too_many_arguments)]
fn apply_record(
    run: &mut Run,
    cfg: &Config,
    metrics: &Metrics,
    trial_id: u64,
    attempt: u32,
    input: u32,
    outcome: Outcome,
    retry: &mut Vec<(u64, u32)>,
    live: bool,
) -> bool {
    let n_inputs = run.plan.inputs.len();
    let Some(t) = run.trials.get_mut(trial_id as usize) else {
        return false;
    };
    *run.outcomes.entry(outcome.as_str()).or_default() += 1;
    if live {
        metrics
            .campaign_outcomes
            .with_label_values(&[&run.id.to_string(), outcome.as_str()])
            .inc();
    }
    if t.fin.is_some() {
        return false;
    }
    t.recs.push((attempt, input, outcome));
    match trial::status(&t.recs, n_inputs, cfg.timing.max_attempts) {
        TrialStatus::Final { outcome, .. } => {
            t.fin = Some(outcome);
            t.recs = Vec::new();
            run.done += 1;
            let inj = &run.injections[trial_id as usize];
            if live {
                metrics.count_final_trial(
                    &run.id.to_string(),
                    &inj.model,
                    &inj.layer,
                    &inj.voltages,
                    outcome,
                );
            }
            let s = inj.stratum as usize;
            if let Some(es) = run.plan.early_stop
                && run.stopped[s].is_none()
            {
                let ids = &run.strata_trials[s];
                let finals = ids.iter().map(|id| run.trials[*id as usize].fin);
                run.stopped[s] = trial::early_stop_point(finals, &es);
            }
            true
        }
        TrialStatus::Abandoned => {
            t.fin = Some(Outcome::InfraError);
            t.recs = Vec::new();
            run.done += 1;
            true
        }
        TrialStatus::Retry { attempt } => {
            if attempt > t.attempt {
                t.attempt = attempt;
                retry.push((trial_id, attempt));
                return true;
            }
            false
        }
        TrialStatus::Pending => false,
    }
}

impl Shared {
    /// A new campaign (already stored) starts running.
    pub fn add_campaign(
        &self,
        id: u64,
        plan: Plan,
        strata: Vec<Stratum>,
        injections: Vec<Injection>,
    ) {
        let mut run = new_run(id, plan, RunState::Running, strata, injections);
        run.started_ms = Some(now_ms());
        let mut lab = self.lab();
        self.metrics
            .campaign_trials_planned
            .with_label_values(&[&id.to_string()])
            .set(run.total() as i64);
        lab.runs.insert(id, run);
        let store = self.store.clone();
        tokio::spawn(async move {
            let _ = store.set_campaign_state(id, "running").await;
        });
        self.pump(&mut lab);
    }

    /// Records just committed for `board`; only the new ones (not duplicates) come here.
    pub fn on_records(self: &Arc<Self>, board: &str, records: &[&Record]) {
        let mut lab = self.lab();
        let now = now_ms();
        let mut retries: Vec<(u64, u64, u32)> = Vec::new();
        let mut changed: Vec<(u64, u64)> = Vec::new();
        for r in records {
            if let Some(h) = lab.health_jobs.get_mut(&r.job_id) {
                if r.outcome != Outcome::Masked {
                    h.mismatch = true;
                }
                continue;
            }
            if let Some(b) = lab.field_jobs.get(&r.job_id) {
                let b = b.clone();
                self.metrics.canary_runs.with_label_values(&[&b]).inc();
                if r.outcome != Outcome::Masked {
                    self.metrics
                        .canary_mismatches
                        .with_label_values(&[&b])
                        .inc();
                }
                continue;
            }
            let Some(run) = lab.runs.get_mut(&r.campaign_id) else {
                continue;
            };
            if let Some(inj) = run.injections.get(r.trial_id as usize) {
                self.metrics
                    .trial_outcomes
                    .with_label_values(&[&inj.model, r.outcome.as_str()])
                    .inc();
                if r.latency_ns > 0 {
                    self.metrics
                        .inference_latency
                        .with_label_values(&[&inj.model])
                        .observe(r.latency_ns as f64 / 1e9);
                }
            }
            let mut rt = Vec::new();
            if apply_record(
                run,
                &self.cfg,
                &self.metrics,
                r.trial_id,
                r.attempt,
                r.input,
                r.outcome,
                &mut rt,
                true,
            ) {
                changed.push((r.campaign_id, r.trial_id));
            }
            retries.extend(rt.into_iter().map(|(t, a)| (r.campaign_id, t, a)));
        }
        if let Some(l) = lab.leases.get_mut(board) {
            l.last_progress_ms = now;
        }
        // Trials that became final or need a retry leave every lease holding them.
        if !changed.is_empty() {
            let done: std::collections::HashSet<(u64, u64)> = changed.iter().copied().collect();
            for l in lab.leases.values_mut() {
                l.outstanding.retain(|t| !done.contains(&(l.campaign, *t)));
                if let Some(h) = l.held
                    && done.contains(&(l.campaign, h))
                {
                    l.held = None;
                }
            }
        }
        for (c, t, a) in retries {
            self.metrics.infra_retries.inc();
            if let Some(run) = lab.runs.get_mut(&c) {
                requeue(run, t);
            }
            let store = self.store.clone();
            tokio::spawn(async move {
                let _ = store.bump_attempt(c, t, a, "infra_error".into()).await;
            });
        }
        self.finish_runs(&mut lab);
        self.pump(&mut lab);
    }

    fn finish_runs(&self, lab: &mut Lab) {
        let mut finished = Vec::new();
        for run in lab.runs.values_mut() {
            if run.state == RunState::Running || run.state == RunState::Paused {
                let (d, p) = run.progress();
                let id = run.id.to_string();
                self.metrics
                    .campaign_trials_done
                    .with_label_values(&[&id])
                    .set(d as i64);
                self.metrics
                    .campaign_progress
                    .with_label_values(&[&id])
                    .set(if p == 0 { 1.0 } else { d as f64 / p as f64 });
                if run.state == RunState::Running && run.needed() == 0 {
                    run.state = RunState::Done;
                    finished.push((run.id, "done"));
                }
            }
            if run.state == RunState::Running
                && let (Some(lim), Some(start)) = (run.plan.time_limit_s, run.started_ms)
                && now_ms() > start + lim * 1000
            {
                run.state = RunState::TimedOut;
                finished.push((run.id, "timed_out"));
            }
        }
        for (id, st) in finished {
            tracing::info!(campaign = id, state = st, "campaign finished");
            self.end_run(lab, id, st);
        }
    }

    fn end_run(&self, lab: &mut Lab, id: u64, state: &'static str) {
        self.metrics.forget_campaign(&id.to_string());
        for (b, l) in lab.leases.iter_mut() {
            if l.campaign == id
                && let Some(board) = lab.boards.get(b)
            {
                board.send(ControllerMsg::Cancel { job_id: l.job_id });
                l.last_sent = true;
            }
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            let _ = store.set_campaign_state(id, state).await;
        });
    }

    pub fn set_run_state(&self, id: u64, action: &str) -> Result<RunState, String> {
        let mut lab = self.lab();
        let run = lab
            .runs
            .get_mut(&id)
            .ok_or(format!("campaign {id} is not active"))?;
        let new = match (action, run.state) {
            ("pause", RunState::Running) => RunState::Paused,
            ("resume", RunState::Paused) => RunState::Running,
            ("cancel", s) if !s.finished() => RunState::Cancelled,
            (a, s) => return Err(format!("cannot {a} a campaign that is {}", s.as_str())),
        };
        run.state = new;
        match new {
            RunState::Cancelled => self.end_run(&mut lab, id, "cancelled"),
            s => {
                let store = self.store.clone();
                let st = s.as_str();
                tokio::spawn(async move {
                    let _ = store.set_campaign_state(id, st).await;
                });
            }
        }
        self.pump(&mut lab);
        Ok(new)
    }

    /// Hand out work: new jobs to idle healthy boards, top-ups to running leases.
    pub fn pump(&self, lab: &mut Lab) {
        let chunk = self.cfg.timing.chunk_size;
        // Top up or close running leases.
        let board_ids: Vec<String> = lab.leases.keys().cloned().collect();
        for b in board_ids {
            let Lab {
                boards,
                runs,
                leases,
                ..
            } = lab;
            let Some(l) = leases.get_mut(&b) else {
                continue;
            };
            let Some(board) = boards.get(&b) else {
                continue;
            };
            if l.last_sent
                || board.session.is_none()
                || lab.recovering.contains(&b)
                || l.held.is_some()
            {
                continue;
            }
            let Some(run) = runs.get_mut(&l.campaign) else {
                continue;
            };
            if run.state != RunState::Running {
                board.send(ControllerMsg::Trials(TrialChunk {
                    job_id: l.job_id,
                    trials: vec![],
                    last: true,
                }));
                l.last_sent = true;
                continue;
            }
            if l.outstanding.len() > chunk / 2 {
                continue;
            }
            let specs = take_chunk(run, &l.model, chunk);
            let last = run.pending.get(&l.model).is_none_or(|q| q.is_empty());
            l.outstanding.extend(specs.iter().map(|s| s.trial_id));
            l.last_sent = last;
            board.send(ControllerMsg::Trials(TrialChunk {
                job_id: l.job_id,
                trials: specs,
                last,
            }));
        }
        // New jobs for idle boards.
        let now = now_ms();
        let offline_after = self.cfg.timing.offline_after_ms;
        let idle: Vec<String> = lab
            .boards
            .values()
            .filter(|b| {
                b.state == SchedState::Idle
                    && b.health == Health::Good
                    && b.connectivity(now, offline_after) == crate::registry::Connectivity::Online
                    && !lab.leases.contains_key(&b.id)
                    && !lab.recovering.contains(&b.id)
                    && !lab.cancels.contains_key(&b.id)
            })
            .map(|b| b.id.clone())
            .collect();
        for b in idle {
            let mut order: Vec<(u32, u64)> = lab
                .runs
                .values()
                .filter(|r| r.state == RunState::Running)
                .map(|r| (r.plan.priority, r.id))
                .collect();
            order.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            for (_, rid) in order {
                let busy = lab.leases.values().filter(|l| l.campaign == rid).count() as u32;
                let Lab {
                    boards,
                    runs,
                    leases,
                    ..
                } = &mut *lab;
                let board = &boards[&b];
                let run = runs.get_mut(&rid).expect("listed above");
                if !board.matches(&run.plan.selector.labels) {
                    continue;
                }
                if run.plan.selector.count.is_some_and(|c| busy >= c) {
                    continue;
                }
                let models: Vec<String> = board
                    .capabilities
                    .as_ref()
                    .map(|c| c.models.iter().map(|m| m.name.clone()).collect())
                    .unwrap_or_default();
                let Some(model) = run
                    .plan
                    .models
                    .iter()
                    .find(|m| {
                        models.contains(m) && run.pending.get(*m).is_some_and(|q| !q.is_empty())
                    })
                    .cloned()
                else {
                    continue;
                };
                let job_id = self.next_job_id();
                let specs = take_chunk(run, &model, chunk);
                if specs.is_empty() {
                    continue;
                }
                let last = run.pending.get(&model).is_none_or(|q| q.is_empty());
                let o = &run.plan.outcomes;
                board.send(ControllerMsg::Job(JobSpec {
                    job_id,
                    campaign_id: rid,
                    model: model.clone(),
                    inputs: run.plan.inputs.clone(),
                    mode: JobMode::Inject,
                    timeout_factor: o.timeout_factor,
                    critical_iou: o.critical_iou,
                    golden_every: o.golden_every,
                }));
                let outstanding: Vec<u64> = specs.iter().map(|s| s.trial_id).collect();
                board.send(ControllerMsg::Trials(TrialChunk {
                    job_id,
                    trials: specs,
                    last,
                }));
                tracing::info!(board = %b, campaign = rid, job = job_id, %model, "job dispatched");
                leases.insert(
                    b.clone(),
                    Lease {
                        campaign: rid,
                        job_id,
                        model,
                        outstanding,
                        last_sent: last,
                        timeout_ns: None,
                        last_progress_ms: now,
                        held: None,
                    },
                );
                if let Some(bm) = boards.get_mut(&b) {
                    bm.state = SchedState::Running;
                }
                break;
            }
        }
        self.update_board_gauges(lab);
    }

    pub fn update_board_gauges(&self, lab: &Lab) {
        let now = now_ms();
        let off = self.cfg.timing.offline_after_ms;
        let m = &self.metrics;
        let mut counts: HashMap<(&str, &str, &str), i64> = HashMap::new();
        for b in lab.boards.values() {
            let c = b.connectivity(now, off);
            *counts
                .entry((
                    c.as_str(),
                    b.state.as_str(),
                    b.shown_health(now, off).as_str(),
                ))
                .or_default() += 1;
            m.board_up
                .with_label_values(&[&b.id])
                .set((c == crate::registry::Connectivity::Online) as i64);
            // All six values on every update, so a health change never leaves a stale 1.
            let shown = b.shown_health(now, off);
            for h in Health::ALL {
                m.board_health
                    .with_label_values(&[&b.id, h.as_str()])
                    .set((h == shown) as i64);
            }
        }
        for c in crate::registry::Connectivity::ALL {
            for s in SchedState::ALL {
                for h in Health::ALL {
                    let v = counts
                        .get(&(c.as_str(), s.as_str(), h.as_str()))
                        .copied()
                        .unwrap_or(0);
                    m.boards
                        .with_label_values(&[c.as_str(), s.as_str(), h.as_str()])
                        .set(v);
                }
            }
        }
    }

    /// Ends a lease: unfinished trials go back to the queue (same attempt).
    pub fn release_lease(&self, lab: &mut Lab, board: &str) {
        if let Some(l) = lab.leases.remove(board)
            && let Some(run) = lab.runs.get_mut(&l.campaign)
        {
            for t in l.outstanding.iter().chain(l.held.iter()) {
                requeue(run, *t);
            }
        }
        if let Some(b) = lab.boards.get_mut(board)
            && b.state != SchedState::Recovering
        {
            b.state = SchedState::Idle;
        }
    }

    pub fn on_job_state(self: &Arc<Self>, board: &str, js: &JobState) {
        let mut lab = self.lab();
        if let Some(h) = lab.health_jobs.get_mut(&js.job_id) {
            let ok = match js.state {
                JobPhase::Finished => Some(!h.mismatch),
                JobPhase::Cancelled | JobPhase::Failed | JobPhase::Suspect => Some(false),
                _ => None,
            };
            if let Some(ok) = ok
                && let Some(mut h) = lab.health_jobs.remove(&js.job_id)
                && let Some(tx) = h.tx.take()
            {
                let _ = tx.send(ok);
            }
            return;
        }
        let terminal = matches!(
            js.state,
            JobPhase::Finished | JobPhase::Cancelled | JobPhase::Failed | JobPhase::Suspect
        );
        if terminal
            && let Some((j, _)) = lab.cancels.get(board)
            && *j == js.job_id
            && let Some((_, waiters)) = lab.cancels.remove(board)
        {
            for w in waiters {
                let _ = w.send(());
            }
        }
        let is_lease = lab.leases.get(board).is_some_and(|l| l.job_id == js.job_id);
        if !is_lease {
            self.pump(&mut lab);
            return;
        }
        match js.state {
            JobPhase::GoldenReady { timeout_ns, .. } => {
                if let Some(l) = lab.leases.get_mut(board) {
                    l.timeout_ns = Some(timeout_ns);
                    l.last_progress_ms = now_ms();
                }
            }
            JobPhase::Finished => {
                // Finished with trials that never produced a record: the harness lost
                // them. That is an infrastructure error (retried, capped), so an agent
                // that keeps doing it cannot make the campaign loop forever.
                let lost: Vec<Record> = match (
                    lab.leases.get(board),
                    lab.leases
                        .get(board)
                        .and_then(|l| lab.runs.get(&l.campaign)),
                ) {
                    (Some(l), Some(run)) if l.last_sent => l
                        .outstanding
                        .iter()
                        .filter(|t| run.trials[**t as usize].recs.is_empty())
                        .map(|t| {
                            infra_record(
                                l.campaign,
                                l.job_id,
                                *t,
                                run.trials[*t as usize].attempt,
                                run.plan.inputs.first().copied().unwrap_or(0),
                            )
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                self.release_lease(&mut lab, board);
                if !lost.is_empty() {
                    tracing::warn!(
                        board,
                        job = js.job_id,
                        trials = lost.len(),
                        "job finished without results for some trials"
                    );
                    let me = self.clone();
                    let board = board.to_string();
                    tokio::spawn(async move {
                        if let Ok(new) = me.store.ingest(&board, lost.clone(), 0).await {
                            let fresh: Vec<&Record> = lost
                                .iter()
                                .zip(&new)
                                .filter(|(_, n)| **n)
                                .map(|(r, _)| r)
                                .collect();
                            me.on_records(&board, &fresh);
                        }
                    });
                }
            }
            JobPhase::Cancelled => {
                self.release_lease(&mut lab, board);
            }
            JobPhase::Failed | JobPhase::Suspect => {
                tracing::warn!(board, job = js.job_id, detail = ?js.detail, "job ended as {:?}", js.state);
                self.release_lease(&mut lab, board);
                if let Some(b) = lab.boards.get_mut(board) {
                    b.health = Health::Suspect;
                    b.health_reason = js.detail.clone();
                }
                drop(lab);
                self.start_health_check(board.to_string(), false);
                return;
            }
            JobPhase::Started => {}
        }
        self.pump(&mut lab);
    }

    /// Agent session established (auth and negotiation already done by the link).
    pub fn on_hello(
        self: &Arc<Self>,
        board: &str,
        session: Session,
        caps: proto::wire::Capabilities,
        agent_version: String,
    ) -> u64 {
        let mut lab = self.lab();
        let now = now_ms();
        let b = lab
            .boards
            .entry(board.to_string())
            .or_insert_with(|| Board::new(board, BTreeMap::new()));
        b.session = Some(session.clone());
        b.last_seen_ms = now;
        // Hard limits per rail, for the out-of-band alert. Same caps as telemetry rails
        // (a handful per board file) so a hostile Hello cannot blow up the label space.
        for r in caps.rails.iter().take(16).filter(|r| r.name.len() <= 32) {
            self.metrics
                .rail_min_volts
                .with_label_values(&[board, r.name.as_str()])
                .set(r.min_mv as f64 / 1000.0);
            self.metrics
                .rail_max_volts
                .with_label_values(&[board, r.name.as_str()])
                .set(r.max_mv as f64 / 1000.0);
        }
        b.capabilities = Some(caps);
        b.agent_version = Some(agent_version);
        let committed = b.committed_upto;
        let recovering = lab.recovering.contains(board);
        let lease_job = lab.leases.get(board).map(|l| l.job_id);
        match (session.active_job_at_hello, lease_job) {
            (Some(a), Some(l)) if a == l && !recovering => {
                // Short outage: the agent kept the job. Re-send what has no result
                // yet (the agent ignores trials it already holds).
                let Lab {
                    boards,
                    runs,
                    leases,
                    ..
                } = &mut *lab;
                let lease = leases.get_mut(board).expect("checked");
                lease.last_progress_ms = now;
                if let Some(run) = runs.get(&lease.campaign) {
                    let specs: Vec<TrialSpec> = lease
                        .outstanding
                        .iter()
                        .map(|t| trial_spec(run, *t))
                        .collect();
                    boards[board].send(ControllerMsg::Trials(TrialChunk {
                        job_id: lease.job_id,
                        trials: specs,
                        last: lease.last_sent,
                    }));
                }
                tracing::info!(board, job = a, "agent resumed its job");
            }
            (active, _) => {
                if lease_job.is_some() && !recovering {
                    self.release_lease(&mut lab, board);
                }
                if let Some(j) = active {
                    // A job we no longer track (controller restart, recovery): stop it
                    // before anything else; its records still arrive and are kept.
                    lab.boards[board].send(ControllerMsg::Cancel { job_id: j });
                    lab.cancels
                        .entry(board.to_string())
                        .or_insert((j, Vec::new()))
                        .0 = j;
                }
                if !recovering {
                    if let Some(b) = lab.boards.get_mut(board) {
                        b.state = SchedState::Reserved;
                    }
                    drop(lab);
                    self.start_health_check(board.to_string(), true);
                    return committed;
                }
            }
        }
        self.pump(&mut lab);
        committed
    }

    pub fn on_disconnect(self: &Arc<Self>, board: &str, session_id: u64) {
        let mut lab = self.lab();
        let Some(b) = lab.boards.get_mut(board) else {
            return;
        };
        if b.session.as_ref().map(|s| s.id) != Some(session_id) {
            return; // an older session closing after a newer one took over
        }
        b.session = None;
        let to_fail: Vec<u64> = lab
            .health_jobs
            .iter()
            .filter(|(_, h)| h.board == board)
            .map(|(j, _)| *j)
            .collect();
        for j in to_fail {
            if let Some(mut h) = lab.health_jobs.remove(&j)
                && let Some(tx) = h.tx.take()
            {
                let _ = tx.send(false);
            }
        }
        self.update_board_gauges(&lab);
        if lab.recovering.contains(board) {
            return;
        }
        drop(lab);
        // Give the agent time to come back before escalating.
        let me = self.clone();
        let board = board.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(
                me.cfg.timing.reconnect_wait_ms,
            ))
            .await;
            let lost = {
                let lab = me.lab();
                lab.boards.get(&board).is_some_and(|b| b.session.is_none())
                    && !lab.recovering.contains(&board)
            };
            if lost {
                crate::recovery::start(me.clone(), board, "agent lost".into(), false);
            }
        });
    }

    pub fn on_seen(&self, board: &str) {
        let mut lab = self.lab();
        if let Some(b) = lab.boards.get_mut(board) {
            b.last_seen_ms = now_ms();
        }
    }

    /// Runs a fault-free health job; on the first connection (`initial`) the result
    /// sets the board's health and frees it for work.
    pub fn start_health_check(self: &Arc<Self>, board: String, initial: bool) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Some(rx) = me.cancel_wait(&board) {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(60), rx).await;
            }
            // A board that is still booting fails its first checks (accelerator not up
            // yet): retry with a short backoff before calling it unhealthy.
            let mut ok = false;
            for attempt in 0..5u64 {
                ok = me.health_check(&board).await;
                let online = me
                    .lab()
                    .boards
                    .get(&board)
                    .is_some_and(|b| b.session.is_some());
                if ok || !online {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500 * (attempt + 1))).await;
            }
            let (health, reason) = if ok {
                (Health::Good, None)
            } else {
                (
                    if initial {
                        Health::Bad
                    } else {
                        Health::Suspect
                    },
                    Some("health check failed".to_string()),
                )
            };
            let fr = {
                let mut lab = me.lab();
                if lab.recovering.contains(&board) {
                    return;
                }
                let Some(b) = lab.boards.get_mut(&board) else {
                    return;
                };
                if b.health.is_sticky() && b.health != Health::Bad {
                    return; // maintenance/retired set meanwhile by an operator
                }
                b.health = health;
                b.health_reason = reason.clone();
                if b.state == SchedState::Reserved {
                    b.state = SchedState::Idle;
                }
                let fr = b.failed_recoveries;
                me.pump(&mut lab);
                fr
            };
            tracing::info!(board, ok, "health check");
            let _ = me
                .store
                .set_board_health(&board, health.as_str(), reason, fr)
                .await;
            if !ok && !initial {
                crate::recovery::start(me.clone(), board, "health check failed".into(), false);
            }
        });
    }

    /// A receiver that fires when a pending cancel on `board` completed.
    pub fn cancel_wait(&self, board: &str) -> Option<oneshot::Receiver<()>> {
        let mut lab = self.lab();
        let (tx, rx) = oneshot::channel();
        let e = lab.cancels.get_mut(board)?;
        e.1.push(tx);
        Some(rx)
    }

    /// Sends a health job and waits for its verdict.
    pub async fn health_check(&self, board: &str) -> bool {
        let rx = {
            let mut lab = self.lab();
            let Some(b) = lab.boards.get(board) else {
                return false;
            };
            let Some(caps) = &b.capabilities else {
                return false;
            };
            let Some(model) = caps.models.first() else {
                return false;
            };
            let job_id = self.next_job_id();
            let n = model.inputs.clamp(1, 4);
            let sent = b.send(ControllerMsg::Job(JobSpec {
                job_id,
                campaign_id: 0,
                model: model.name.clone(),
                inputs: (0..n).collect(),
                mode: JobMode::Health,
                timeout_factor: 10.0,
                critical_iou: 0.0,
                golden_every: 0,
            }));
            if !sent {
                return false;
            }
            let (tx, rx) = oneshot::channel();
            lab.health_jobs.insert(
                job_id,
                HealthWait {
                    board: board.to_string(),
                    mismatch: false,
                    tx: Some(tx),
                },
            );
            rx
        };
        let r = tokio::time::timeout(
            std::time::Duration::from_millis(self.cfg.timing.boot_wait_ms.max(10_000)),
            rx,
        )
        .await;
        if r.is_err() {
            // Do not leave the agent busy with a check nobody waits for.
            let mut lab = self.lab();
            let stale: Vec<u64> = lab
                .health_jobs
                .iter()
                .filter(|(_, h)| h.board == board)
                .map(|(j, _)| *j)
                .collect();
            for j in stale {
                lab.health_jobs.remove(&j);
                if let Some(b) = lab.boards.get(board) {
                    b.send(ControllerMsg::Cancel { job_id: j });
                }
            }
        }
        matches!(r, Ok(Ok(true)))
    }

    /// Periodic work: stalled leases, time limits, gauges.
    pub fn tick(self: &Arc<Self>) {
        let mut lab = self.lab();
        let now = now_ms();
        let mut stalled = Vec::new();
        for (b, l) in &lab.leases {
            if l.outstanding.is_empty() || lab.recovering.contains(b) {
                continue;
            }
            let per = l.timeout_ns.unwrap_or(0) / 1_000_000;
            let inputs = lab
                .runs
                .get(&l.campaign)
                .map(|r| r.plan.inputs.len() as u64)
                .unwrap_or(1);
            let limit = per * inputs * 3 + self.cfg.timing.stall_slack_ms;
            let online = lab.boards.get(b).is_some_and(|x| x.session.is_some());
            if online && now.saturating_sub(l.last_progress_ms) > limit {
                stalled.push(b.clone());
            }
        }
        self.finish_runs(&mut lab);
        self.pump(&mut lab);
        drop(lab);
        for b in stalled {
            crate::recovery::start(
                self.clone(),
                b,
                "no progress within the golden-derived deadline".into(),
                false,
            );
        }
    }

    /// Marks a board's current trial as crashed (the board died during it) and returns
    /// the rest of its lease to the queue. Returns the held trial.
    pub fn hold_in_flight(&self, board: &str) -> Option<(u64, u64, u64, u32)> {
        let mut lab = self.lab();
        let Lab { runs, leases, .. } = &mut *lab;
        let l = leases.get_mut(board)?;
        let run = runs.get_mut(&l.campaign)?;
        if l.held.is_none() {
            l.outstanding
                .retain(|t| run.trials[*t as usize].fin.is_none());
            if !l.outstanding.is_empty() {
                l.held = Some(l.outstanding.remove(0));
            }
            for t in l.outstanding.drain(..) {
                requeue(run, t);
            }
        }
        let h = l.held?;
        Some((l.campaign, l.job_id, h, run.trials[h as usize].attempt))
    }

    pub fn run_inputs(&self, campaign: u64) -> Vec<u32> {
        self.lab()
            .runs
            .get(&campaign)
            .map(|r| r.plan.inputs.clone())
            .unwrap_or_default()
    }

    pub fn trial_is_final(&self, campaign: u64, trial: u64) -> bool {
        self.lab()
            .runs
            .get(&campaign)
            .and_then(|r| r.trials.get(trial as usize))
            .is_none_or(|t| t.fin.is_some())
    }

    /// Progress snapshot of an active campaign for the API.
    pub fn run_status(&self, id: u64) -> Option<serde_json::Value> {
        let lab = self.lab();
        let r = lab.runs.get(&id)?;
        let (done, planned) = r.progress();
        let boards: Vec<&String> = lab
            .leases
            .iter()
            .filter(|(_, l)| l.campaign == id)
            .map(|(b, _)| b)
            .collect();
        Some(serde_json::json!({
            "state": r.state.as_str(), "done": done, "planned": planned, "list_len": r.total(),
            "inference_outcomes": r.outcomes, "boards": boards,
            "early_stopped_strata": r.stopped.iter().filter(|s| s.is_some()).count(),
        }))
    }
}

fn infra_record(campaign: u64, job: u64, trial: u64, attempt: u32, input: u32) -> Record {
    Record {
        job_id: job,
        campaign_id: campaign,
        trial_id: trial,
        attempt,
        input,
        ..Record::unmeasured(
            Outcome::InfraError,
            "job finished without a result for this trial".into(),
        )
    }
}

fn requeue(run: &mut Run, t: u64) {
    let Some(tr) = run.trials.get_mut(t as usize) else {
        return;
    };
    if tr.fin.is_some() || tr.queued {
        return;
    }
    tr.queued = true;
    let model = run.injections[t as usize].model.clone();
    run.pending.entry(model).or_default().push_front(t);
}

fn trial_spec(run: &Run, t: u64) -> TrialSpec {
    let inj = &run.injections[t as usize];
    TrialSpec {
        trial_id: t,
        attempt: run.trials[t as usize].attempt,
        faults: inj.faults.clone(),
        voltages: inj.voltages.clone(),
    }
}

fn take_chunk(run: &mut Run, model: &str, n: usize) -> Vec<TrialSpec> {
    let mut out = Vec::new();
    while out.len() < n {
        let Some(t) = run.pending.get_mut(model).and_then(|q| q.pop_front()) else {
            break;
        };
        run.trials[t as usize].queued = false;
        if run.trials[t as usize].fin.is_some() || run.stratum_stopped(t) {
            continue;
        }
        out.push(trial_spec(run, t));
    }
    out
}
