//! Durable state in SQLite (WAL) inside the data directory.
//!
//! All writes go through one writer thread. Record batches that arrive while a
//! transaction is being written are grouped into the next one (group commit), each
//! record is a single cached `INSERT ... ON CONFLICT DO NOTHING`, and the caller's
//! future resolves only after COMMIT returned: that is when the agent gets its ack.
//! Reads use a second connection (WAL readers never block the writer).

pub mod schema;

use crate::campaign::{Compiled, Plan};
use crate::metrics::Metrics;
use proto::wire::Record;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("the store writer has stopped")]
    Closed,
    #[error("{0}")]
    Data(String),
}

type ExecFn = Box<dyn FnOnce(&mut Connection) + Send>;

enum Op {
    Ingest {
        board: String,
        records: Vec<Record>,
        upto: u64,
        reply: oneshot::Sender<Result<Vec<bool>, String>>,
    },
    Exec(ExecFn),
}

#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    read: Arc<Mutex<Connection>>,
    pub dir: PathBuf,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CampaignRow {
    pub id: u64,
    pub name: String,
    pub hash: String,
    pub state: String,
    pub total: u64,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub plan: Plan,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BoardRow {
    pub id: String,
    pub committed_upto: u64,
    pub health: String,
    pub health_reason: Option<String>,
    pub failed_recoveries: u32,
}

/// One stored inference, as reports and exports see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ResultRow {
    pub campaign_id: u64,
    pub trial_id: u64,
    pub attempt: u32,
    pub input: u32,
    pub board: String,
    pub outcome: &'static str,
    pub failure: bool,
    pub mismatched_pixels: u32,
    pub nonfinite: u32,
    pub iou_vs_golden: f32,
    pub iou_vs_truth: f32,
    pub golden_iou_vs_truth: f32,
    pub latency_ns: u64,
    pub power_w: f32,
    pub vccint_mv: f32,
    pub temp_c: f32,
    pub start_unix_ns: u64,
    pub stratum: u32,
    pub model: String,
    pub layer: String,
    pub tensor_kind: String,
    pub bit: u8,
    pub voltages: String,
}

impl Store {
    pub fn open(dir: &Path, metrics: Arc<Metrics>, batch: usize) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io(dir.to_path_buf(), e))?;
        let path = dir.join("hil.sqlite");
        let mut w = Connection::open(&path)?;
        schema::configure(&w)?;
        schema::migrate(&mut w)?;
        let r = Connection::open(&path)?;
        schema::configure(&r)?;
        let (tx, rx) = mpsc::channel::<Op>();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer(w, rx, metrics, batch.max(1)))
            .map_err(|e| StoreError::Io(path.clone(), e))?;
        Ok(Store {
            tx,
            read: Arc::new(Mutex::new(r)),
            dir: dir.to_path_buf(),
        })
    }

    /// Commits `records` (idempotently) and resolves once they are durable. Returns,
    /// per record, whether it was new (false = already stored: a resend or a late copy).
    /// `upto`: the board's committed seq also advances to at least this (records the
    /// caller consumed without storing, e.g. health-check inferences).
    pub async fn ingest(
        &self,
        board: &str,
        records: Vec<Record>,
        upto: u64,
    ) -> Result<Vec<bool>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Ingest {
                board: board.to_string(),
                records,
                upto,
                reply,
            })
            .map_err(|_| StoreError::Closed)?;
        rx.await
            .map_err(|_| StoreError::Closed)?
            .map_err(StoreError::Data)
    }

    /// Runs `f` on the writer connection, in order with ingests.
    pub async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Exec(Box::new(move |c| {
                let _ = reply.send(f(c));
            })))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Blocking variant for start-up and non-async callers.
    pub fn write_blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, rx) = std::sync::mpsc::channel();
        self.tx
            .send(Op::Exec(Box::new(move |c| {
                let _ = reply.send(f(c));
            })))
            .map_err(|_| StoreError::Closed)?;
        rx.recv().map_err(|_| StoreError::Closed)?
    }

    pub fn read_blocking<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let c = self.read.lock().unwrap_or_else(|p| p.into_inner());
        f(&c)
    }

    pub async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let s = self.clone();
        tokio::task::spawn_blocking(move || s.read_blocking(f))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Stores a compiled campaign and its whole list in one transaction.
    pub async fn insert_campaign(&self, yaml: String, c: Compiled) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let tx = conn.transaction()?;
            let plan_json = serde_json::to_string(&c.plan).map_err(|e| StoreError::Data(e.to_string()))?;
            tx.execute(
                "INSERT INTO campaigns (name, hash, spec_yaml, plan_json, state, total, created_ms) VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6)",
                params![c.plan.name, c.hash, yaml, plan_json, c.injections.len() as i64, now_ms() as i64],
            )?;
            let id = tx.last_insert_rowid();
            {
                let mut st = tx.prepare_cached(
                    "INSERT INTO strata (campaign_id, idx, key, model, layer, tensor_kind, bit, voltages_json, population, planned) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
                )?;
                for s in &c.strata {
                    st.execute(params![
                        id,
                        s.idx,
                        s.key,
                        s.model,
                        s.layer,
                        s.tensor_kind,
                        s.bit,
                        serde_json::to_string(&s.voltages).unwrap_or_default(),
                        s.population as i64,
                        s.planned as i64
                    ])?;
                }
                let mut st = tx.prepare_cached(
                    "INSERT INTO injections (campaign_id, trial_id, stratum, model, layer, tensor_kind, bit, faults_json, voltages_json) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)",
                )?;
                for i in &c.injections {
                    st.execute(params![
                        id,
                        i.trial_id as i64,
                        i.stratum,
                        i.model,
                        i.layer,
                        i.tensor_kind,
                        i.bit,
                        serde_json::to_string(&i.faults).unwrap_or_default(),
                        serde_json::to_string(&i.voltages).unwrap_or_default()
                    ])?;
                }
            }
            tx.commit()?;
            Ok(id as u64)
        })
        .await
    }

    pub async fn set_campaign_state(&self, id: u64, state: &'static str) -> Result<(), StoreError> {
        self.write(move |c| {
            let now = now_ms() as i64;
            match state {
                "running" => c.execute(
                    "UPDATE campaigns SET state=?2, started_ms=COALESCE(started_ms, ?3) WHERE id=?1",
                    params![id as i64, state, now],
                )?,
                "done" | "cancelled" | "timed_out" => c.execute(
                    "UPDATE campaigns SET state=?2, finished_ms=?3 WHERE id=?1",
                    params![id as i64, state, now],
                )?,
                _ => c.execute("UPDATE campaigns SET state=?2 WHERE id=?1", params![id as i64, state])?,
            };
            Ok(())
        })
        .await
    }

    pub fn campaigns_blocking(&self) -> Result<Vec<CampaignRow>, StoreError> {
        self.read_blocking(|c| {
            let mut st = c.prepare(
                "SELECT id, name, hash, state, total, created_ms, started_ms, finished_ms, plan_json FROM campaigns ORDER BY id",
            )?;
            let rows = st.query_map([], campaign_row)?;
            let mut out = Vec::new();
            for r in rows {
                out.push(r?.map_err(StoreError::Data)?);
            }
            Ok(out)
        })
    }

    pub fn campaign_blocking(&self, id: u64) -> Result<Option<CampaignRow>, StoreError> {
        self.read_blocking(|c| {
            let r = c
                .query_row(
                    "SELECT id, name, hash, state, total, created_ms, started_ms, finished_ms, plan_json FROM campaigns WHERE id=?1",
                    [id as i64],
                    campaign_row,
                )
                .optional()?;
            r.transpose().map_err(StoreError::Data)
        })
    }

    pub fn spec_yaml_blocking(&self, id: u64) -> Result<String, StoreError> {
        self.read_blocking(|c| {
            Ok(c.query_row(
                "SELECT spec_yaml FROM campaigns WHERE id=?1",
                [id as i64],
                |r| r.get(0),
            )?)
        })
    }

    pub fn strata_blocking(&self, id: u64) -> Result<Vec<crate::campaign::Stratum>, StoreError> {
        self.read_blocking(|c| {
            let mut st = c.prepare(
                "SELECT idx, key, model, layer, tensor_kind, bit, voltages_json, population, planned FROM strata WHERE campaign_id=?1 ORDER BY idx",
            )?;
            let rows = st.query_map([id as i64], |r| {
                Ok(crate::campaign::Stratum {
                    idx: r.get(0)?,
                    key: r.get(1)?,
                    model: r.get(2)?,
                    layer: r.get(3)?,
                    tensor_kind: r.get(4)?,
                    bit: r.get(5)?,
                    voltages: serde_json::from_str(&r.get::<_, String>(6)?).unwrap_or_default(),
                    population: r.get::<_, i64>(7)? as u64,
                    planned: r.get::<_, i64>(8)? as u64,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// The stored list (trial id, stratum, model, faults, voltages).
    pub fn injections_blocking(
        &self,
        id: u64,
    ) -> Result<Vec<crate::campaign::Injection>, StoreError> {
        self.read_blocking(|c| {
            let mut st = c.prepare(
                "SELECT trial_id, stratum, model, layer, tensor_kind, bit, faults_json, voltages_json FROM injections WHERE campaign_id=?1 ORDER BY trial_id",
            )?;
            let rows = st.query_map([id as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, u32>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, u8>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, String>(7)?,
                ))
            })?;
            let mut out = Vec::new();
            for r in rows {
                let (trial_id, stratum, model, layer, tensor_kind, bit, f, v) = r?;
                out.push(crate::campaign::Injection {
                    trial_id,
                    stratum,
                    model,
                    layer,
                    tensor_kind,
                    bit,
                    faults: serde_json::from_str(&f).map_err(|e| StoreError::Data(e.to_string()))?,
                    voltages: serde_json::from_str(&v).map_err(|e| StoreError::Data(e.to_string()))?,
                });
            }
            Ok(out)
        })
    }

    /// (trial, attempt, input, outcome) of every stored record of a campaign.
    pub fn outcomes_blocking(
        &self,
        id: u64,
    ) -> Result<Vec<(u64, u32, u32, proto::wire::Outcome)>, StoreError> {
        self.read_blocking(|c| {
            let mut st = c.prepare_cached(
                "SELECT trial_id, attempt, input, outcome FROM results WHERE campaign_id=?1",
            )?;
            let rows = st.query_map([id as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, u32>(1)?,
                    r.get::<_, u32>(2)?,
                    schema::outcome_from_code(r.get(3)?),
                ))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Persisted infra-retry counters: trial -> current attempt.
    pub fn attempts_blocking(&self, id: u64) -> Result<Vec<(u64, u32)>, StoreError> {
        self.read_blocking(|c| {
            let mut st =
                c.prepare("SELECT trial_id, attempt FROM attempts WHERE campaign_id=?1")?;
            let rows =
                st.query_map([id as i64], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    pub async fn bump_attempt(
        &self,
        campaign: u64,
        trial: u64,
        attempt: u32,
        err: String,
    ) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute(
                "INSERT INTO attempts (campaign_id, trial_id, attempt, last_error) VALUES (?1,?2,?3,?4) \
                 ON CONFLICT(campaign_id, trial_id) DO UPDATE SET attempt=max(attempt, excluded.attempt), last_error=excluded.last_error",
                params![campaign as i64, trial as i64, attempt, err],
            )?;
            Ok(())
        })
        .await
    }

    pub fn boards_blocking(&self) -> Result<Vec<BoardRow>, StoreError> {
        self.read_blocking(|c| {
            let mut st = c.prepare(
                "SELECT id, committed_upto, health, health_reason, failed_recoveries FROM boards ORDER BY id",
            )?;
            let rows = st.query_map([], |r| {
                Ok(BoardRow {
                    id: r.get(0)?,
                    committed_upto: r.get::<_, i64>(1)? as u64,
                    health: r.get(2)?,
                    health_reason: r.get(3)?,
                    failed_recoveries: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    pub async fn set_board_health(
        &self,
        board: &str,
        health: &'static str,
        reason: Option<String>,
        failed_recoveries: u32,
    ) -> Result<(), StoreError> {
        let board = board.to_string();
        self.write(move |c| {
            c.execute(
                "INSERT INTO boards (id, health, health_reason, failed_recoveries, updated_ms) VALUES (?1,?2,?3,?4,?5) \
                 ON CONFLICT(id) DO UPDATE SET health=excluded.health, health_reason=excluded.health_reason, \
                 failed_recoveries=excluded.failed_recoveries, updated_ms=excluded.updated_ms",
                params![board, health, reason, failed_recoveries, now_ms() as i64],
            )?;
            Ok(())
        })
        .await
    }

    pub fn committed_upto_blocking(&self, board: &str) -> Result<u64, StoreError> {
        self.read_blocking(|c| {
            Ok(c.query_row(
                "SELECT committed_upto FROM boards WHERE id=?1",
                [board],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .unwrap_or(0) as u64)
        })
    }

    pub async fn open_incident(
        &self,
        board: &str,
        cause: String,
        trials: Vec<(u64, u64)>,
    ) -> Result<u64, StoreError> {
        let board = board.to_string();
        self.write(move |c| {
            c.execute(
                "INSERT INTO incidents (board, started_ms, cause, trial_ids_json) VALUES (?1,?2,?3,?4)",
                params![board, now_ms() as i64, cause, serde_json::to_string(&trials).unwrap_or_default()],
            )?;
            Ok(c.last_insert_rowid() as u64)
        })
        .await
    }

    pub async fn close_incident(
        &self,
        id: u64,
        actions: Vec<String>,
        result: &'static str,
        bundle: Option<String>,
    ) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute(
                "UPDATE incidents SET finished_ms=?2, actions_json=?3, result=?4, bundle_dir=?5 WHERE id=?1",
                params![id as i64, now_ms() as i64, serde_json::to_string(&actions).unwrap_or_default(), result, bundle],
            )?;
            Ok(())
        })
        .await
    }

    pub fn incidents_blocking(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        self.read_blocking(|c| {
            let mut st = c.prepare(
                "SELECT id, board, started_ms, finished_ms, cause, actions_json, result, bundle_dir, trial_ids_json FROM incidents ORDER BY id",
            )?;
            let rows = st.query_map([], |r| {
                Ok(serde_json::json!({
                    "id": r.get::<_, i64>(0)?, "board": r.get::<_, String>(1)?,
                    "started_ms": r.get::<_, i64>(2)?, "finished_ms": r.get::<_, Option<i64>>(3)?,
                    "cause": r.get::<_, String>(4)?,
                    "actions": serde_json::from_str::<serde_json::Value>(&r.get::<_, String>(5)?).unwrap_or_default(),
                    "result": r.get::<_, Option<String>>(6)?, "bundle_dir": r.get::<_, Option<String>>(7)?,
                    "trials": serde_json::from_str::<serde_json::Value>(&r.get::<_, String>(8)?).unwrap_or_default(),
                }))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    pub async fn telemetry_summary(
        &self,
        board: &str,
        minute_ms: u64,
        s: TelemetrySummary,
    ) -> Result<(), StoreError> {
        let board = board.to_string();
        self.write(move |c| {
            c.execute(
                "INSERT INTO telemetry (board, minute_ms, samples, power_avg_w, power_max_w, temp_max_c, vccint_min_mv, vccint_max_mv) \
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8) ON CONFLICT DO NOTHING",
                params![board, minute_ms as i64, s.samples, s.power_sum / s.samples.max(1) as f64, s.power_max, s.temp_max, s.vccint_min, s.vccint_max],
            )?;
            Ok(())
        })
        .await
    }

    /// Every record of a campaign joined with its injection, for reports and exports.
    /// Streams rows to `f` to keep memory flat on big campaigns.
    pub fn for_each_result(
        &self,
        id: u64,
        mut f: impl FnMut(ResultRow) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.read_blocking(|c| {
            let mut st = c.prepare(
                "SELECT r.campaign_id, r.trial_id, r.attempt, r.input, r.board, r.outcome, r.mismatched_pixels, r.nonfinite, \
                 r.iou_vs_golden, r.iou_vs_truth, r.golden_iou_vs_truth, r.latency_ns, r.power_w, r.vccint_mv, r.temp_c, r.start_unix_ns, \
                 i.stratum, i.model, i.layer, i.tensor_kind, i.bit, i.voltages_json \
                 FROM results r JOIN injections i ON i.campaign_id = r.campaign_id AND i.trial_id = r.trial_id \
                 WHERE r.campaign_id=?1 ORDER BY r.trial_id, r.attempt, r.input",
            )?;
            let mut rows = st.query([id as i64])?;
            while let Some(r) = rows.next()? {
                let o = schema::outcome_from_code(r.get(5)?);
                f(ResultRow {
                    campaign_id: r.get::<_, i64>(0)? as u64,
                    trial_id: r.get::<_, i64>(1)? as u64,
                    attempt: r.get(2)?,
                    input: r.get(3)?,
                    board: r.get(4)?,
                    outcome: o.as_str(),
                    failure: o.is_failure(),
                    mismatched_pixels: r.get(6)?,
                    nonfinite: r.get(7)?,
                    iou_vs_golden: r.get(8)?,
                    iou_vs_truth: r.get(9)?,
                    golden_iou_vs_truth: r.get(10)?,
                    latency_ns: r.get::<_, i64>(11)? as u64,
                    power_w: r.get(12)?,
                    vccint_mv: r.get(13)?,
                    temp_c: r.get(14)?,
                    start_unix_ns: r.get::<_, i64>(15)? as u64,
                    stratum: r.get(16)?,
                    model: r.get(17)?,
                    layer: r.get(18)?,
                    tensor_kind: r.get(19)?,
                    bit: r.get(20)?,
                    voltages: r.get(21)?,
                })?;
            }
            Ok(())
        })
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct TelemetrySummary {
    pub samples: u32,
    pub power_sum: f64,
    pub power_max: f64,
    pub temp_max: f64,
    pub vccint_min: f64,
    pub vccint_max: f64,
}

fn campaign_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<CampaignRow, String>> {
    let plan: String = r.get(8)?;
    let plan = match serde_json::from_str(&plan) {
        Ok(p) => p,
        Err(e) => return Ok(Err(format!("campaign plan: {e}"))),
    };
    Ok(Ok(CampaignRow {
        id: r.get::<_, i64>(0)? as u64,
        name: r.get(1)?,
        hash: r.get(2)?,
        state: r.get(3)?,
        total: r.get::<_, i64>(4)? as u64,
        created_ms: r.get::<_, i64>(5)? as u64,
        started_ms: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
        finished_ms: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
        plan,
    }))
}

fn writer(mut conn: Connection, rx: mpsc::Receiver<Op>, metrics: Arc<Metrics>, batch: usize) {
    let mut pending: Vec<Op> = Vec::new();
    while let Ok(first) = rx.recv() {
        pending.push(first);
        let mut n = 0usize;
        // Group commit: whatever queued up while the last transaction was written.
        while n < batch {
            match rx.try_recv() {
                Ok(op) => {
                    if let Op::Ingest { records, .. } = &op {
                        n += records.len();
                    }
                    pending.push(op);
                }
                Err(_) => break,
            }
        }
        let mut group: Vec<Pending> = Vec::new();
        for op in pending.drain(..) {
            match op {
                Op::Ingest {
                    board,
                    records,
                    upto,
                    reply,
                } => group.push((board, records, upto, reply)),
                Op::Exec(f) => {
                    commit_group(&mut conn, &mut group, &metrics);
                    let t = Instant::now();
                    f(&mut conn);
                    metrics
                        .store_commit_seconds
                        .with_label_values(&["other"])
                        .observe(t.elapsed().as_secs_f64());
                }
            }
        }
        commit_group(&mut conn, &mut group, &metrics);
    }
}

type Pending = (
    String,
    Vec<Record>,
    u64,
    oneshot::Sender<Result<Vec<bool>, String>>,
);

fn commit_group(conn: &mut Connection, group: &mut Vec<Pending>, metrics: &Metrics) {
    if group.is_empty() {
        return;
    }
    let t = Instant::now();
    let res = (|| -> rusqlite::Result<Vec<Vec<bool>>> {
        let tx = conn.transaction()?;
        let mut all = Vec::with_capacity(group.len());
        {
            let mut st = tx.prepare_cached(schema::INSERT_RESULT)?;
            let mut upto = tx.prepare_cached(
                "INSERT INTO boards (id, committed_upto) VALUES (?1, ?2) \
                 ON CONFLICT(id) DO UPDATE SET committed_upto = max(committed_upto, excluded.committed_upto)",
            )?;
            for (board, records, upto_hint, _) in group.iter() {
                let mut new = Vec::with_capacity(records.len());
                let mut max_seq = *upto_hint;
                for r in records {
                    new.push(schema::insert_result(&mut st, board, r)? == 1);
                    max_seq = max_seq.max(r.seq);
                }
                if max_seq > 0 {
                    upto.execute(params![board, max_seq as i64])?;
                }
                all.push(new);
            }
        }
        tx.commit()?;
        Ok(all)
    })();
    metrics
        .store_commit_seconds
        .with_label_values(&["ingest"])
        .observe(t.elapsed().as_secs_f64());
    match res {
        Ok(all) => {
            for ((_, _, _, reply), new) in group.drain(..).zip(all) {
                let _ = reply.send(Ok(new));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "ingest transaction failed; nothing acked");
            for (_, _, _, reply) in group.drain(..) {
                let _ = reply.send(Err(e.to_string()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::wire::Outcome;

    pub(crate) fn rec(seq: u64, trial: u64, input: u32) -> Record {
        Record {
            seq,
            job_id: 1,
            campaign_id: 1,
            trial_id: trial,
            attempt: 0,
            input,
            outcome: Outcome::Masked,
            mismatched_pixels: 0,
            nonfinite: 0,
            iou_vs_golden: 1.0,
            iou_vs_truth: 0.8,
            golden_iou_vs_truth: 0.8,
            latency_ns: 1000,
            cycles: 10,
            power_w: 3.0,
            vccint_mv: 850.0,
            temp_c: 40.0,
            start_unix_ns: 1,
            end_unix_ns: 2,
            detail: None,
        }
    }

    #[tokio::test]
    async fn ingest_is_idempotent_and_tracks_committed_seq() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path(), Arc::new(Metrics::new()), 1000).unwrap();
        let a = s
            .ingest("b0", vec![rec(1, 0, 0), rec(2, 0, 1)], 0)
            .await
            .unwrap();
        assert_eq!(a, vec![true, true]);
        let b = s
            .ingest("b0", vec![rec(2, 0, 1), rec(3, 1, 0)], 0)
            .await
            .unwrap();
        assert_eq!(b, vec![false, true]);
        assert_eq!(s.committed_upto_blocking("b0").unwrap(), 3);
        assert_eq!(s.outcomes_blocking(1).unwrap().len(), 3);
        drop(s);
        // Reopen: migrations are not re-run, data is there.
        let s = Store::open(d.path(), Arc::new(Metrics::new()), 1000).unwrap();
        assert_eq!(s.outcomes_blocking(1).unwrap().len(), 3);
    }
}
