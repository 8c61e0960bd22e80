//! Schema and migrations. `PRAGMA user_version` is the number of migrations applied;
//! migrations are only ever appended.

use rusqlite::Connection;

pub const MIGRATIONS: &[&str] = &[
    // 1: initial schema
    "
    CREATE TABLE boards (
        id TEXT PRIMARY KEY,
        committed_upto INTEGER NOT NULL DEFAULT 0,
        health TEXT NOT NULL DEFAULT 'unknown',
        health_reason TEXT,
        failed_recoveries INTEGER NOT NULL DEFAULT 0,
        updated_ms INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE campaigns (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        hash TEXT NOT NULL,
        spec_yaml TEXT NOT NULL,
        plan_json TEXT NOT NULL,
        state TEXT NOT NULL,
        total INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        started_ms INTEGER,
        finished_ms INTEGER
    );
    CREATE TABLE strata (
        campaign_id INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        key TEXT NOT NULL,
        model TEXT NOT NULL,
        layer TEXT,
        tensor_kind TEXT,
        bit INTEGER,
        voltages_json TEXT NOT NULL,
        population INTEGER NOT NULL,
        planned INTEGER NOT NULL,
        PRIMARY KEY (campaign_id, idx)
    ) WITHOUT ROWID;
    CREATE TABLE injections (
        campaign_id INTEGER NOT NULL,
        trial_id INTEGER NOT NULL,
        stratum INTEGER NOT NULL,
        model TEXT NOT NULL,
        layer TEXT NOT NULL,
        tensor_kind TEXT NOT NULL,
        bit INTEGER NOT NULL,
        faults_json TEXT NOT NULL,
        voltages_json TEXT NOT NULL,
        PRIMARY KEY (campaign_id, trial_id)
    ) WITHOUT ROWID;
    -- Persisted attempt counter: a row exists only for trials that hit an infra error.
    CREATE TABLE attempts (
        campaign_id INTEGER NOT NULL,
        trial_id INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        last_error TEXT,
        PRIMARY KEY (campaign_id, trial_id)
    ) WITHOUT ROWID;
    -- One row per inference; the key makes ingest idempotent (agent resends, late
    -- results after a reassignment).
    CREATE TABLE results (
        campaign_id INTEGER NOT NULL,
        trial_id INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        input INTEGER NOT NULL,
        board TEXT NOT NULL,
        job_id INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        outcome INTEGER NOT NULL,
        mismatched_pixels INTEGER NOT NULL,
        nonfinite INTEGER NOT NULL,
        iou_vs_golden REAL NOT NULL,
        iou_vs_truth REAL NOT NULL,
        golden_iou_vs_truth REAL NOT NULL,
        latency_ns INTEGER NOT NULL,
        cycles INTEGER NOT NULL,
        power_w REAL NOT NULL,
        vccint_mv REAL NOT NULL,
        temp_c REAL NOT NULL,
        start_unix_ns INTEGER NOT NULL,
        end_unix_ns INTEGER NOT NULL,
        detail TEXT,
        PRIMARY KEY (campaign_id, trial_id, attempt, input)
    ) WITHOUT ROWID;
    CREATE TABLE incidents (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        board TEXT NOT NULL,
        started_ms INTEGER NOT NULL,
        finished_ms INTEGER,
        cause TEXT NOT NULL,
        actions_json TEXT NOT NULL DEFAULT '[]',
        result TEXT,
        bundle_dir TEXT,
        trial_ids_json TEXT NOT NULL DEFAULT '[]'
    );
    CREATE TABLE telemetry (
        board TEXT NOT NULL,
        minute_ms INTEGER NOT NULL,
        samples INTEGER NOT NULL,
        power_avg_w REAL NOT NULL,
        power_max_w REAL NOT NULL,
        temp_max_c REAL NOT NULL,
        vccint_min_mv REAL NOT NULL,
        vccint_max_mv REAL NOT NULL,
        PRIMARY KEY (board, minute_ms)
    ) WITHOUT ROWID;
    ",
];

pub const INSERT_RESULT: &str = "INSERT INTO results (campaign_id, trial_id, attempt, input, board, job_id, seq, outcome, \
     mismatched_pixels, nonfinite, iou_vs_golden, iou_vs_truth, golden_iou_vs_truth, latency_ns, cycles, power_w, \
     vccint_mv, temp_c, start_unix_ns, end_unix_ns, detail) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21) \
     ON CONFLICT DO NOTHING";

/// Connection settings shared by the store and the benchmark baseline, so the two
/// measure the same thing.
pub fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: an ack promises the record survives power loss, not just a process crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

pub fn migrate(conn: &mut Connection) -> rusqlite::Result<u32> {
    let have: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, m) in MIGRATIONS.iter().enumerate().skip(have as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(m)?;
        tx.pragma_update(None, "user_version", (i + 1) as u32)?;
        tx.commit()?;
    }
    Ok(MIGRATIONS.len() as u32)
}

pub fn outcome_code(o: proto::wire::Outcome) -> i64 {
    proto::wire::Outcome::ALL
        .iter()
        .position(|x| *x == o)
        .unwrap_or(0) as i64
}

pub fn outcome_from_code(c: i64) -> proto::wire::Outcome {
    proto::wire::Outcome::ALL
        .get(c as usize)
        .copied()
        .unwrap_or(proto::wire::Outcome::InfraError)
}

/// Binds one record to [`INSERT_RESULT`]; returns rows inserted (0 = duplicate).
pub fn insert_result(
    st: &mut rusqlite::CachedStatement<'_>,
    board: &str,
    r: &proto::wire::Record,
) -> rusqlite::Result<usize> {
    st.execute(rusqlite::params![
        r.campaign_id as i64,
        r.trial_id as i64,
        r.attempt,
        r.input,
        board,
        r.job_id as i64,
        r.seq as i64,
        outcome_code(r.outcome),
        r.mismatched_pixels,
        r.nonfinite,
        r.iou_vs_golden,
        r.iou_vs_truth,
        r.golden_iou_vs_truth,
        r.latency_ns as i64,
        r.cycles as i64,
        r.power_w,
        r.vccint_mv,
        r.temp_c,
        r.start_unix_ns as i64,
        r.end_unix_ns as i64,
        r.detail,
    ])
}
