//! Sustained ingest: 64 agent connections send record batches over real websockets to
//! a real `hil-controller`; a batch counts once its Ack arrived (acks follow commit).
//! Printed next to the raw SQLite insert rate of the same rows on the same machine
//! (same schema, same pragmas, one transaction, one cached prepared statement).

#[path = "common.rs"]
mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use proto::wire::*;
use std::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const AGENTS: usize = 64;
const BATCHES: usize = 40;
const BATCH: usize = 256;
const WINDOW: usize = 4;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = start(dir.path(), AGENTS, "  heartbeat_ms: 1000\n");
    let total = (AGENTS * BATCHES * BATCH) as u64;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let elapsed = rt.block_on(async {
        let mut conns = Vec::new();
        for i in 0..AGENTS {
            conns.push(connect(ctl.port, i).await);
        }
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for (i, ws) in conns.into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                let (mut tx, mut rx) = ws.split();
                let mut sent = 0usize;
                let mut acked_upto = 0u64;
                let last_seq = (BATCHES * BATCH) as u64;
                let mut seq = 0u64;
                while acked_upto < last_seq {
                    // Keep up to WINDOW batches in flight, like an agent draining its spool.
                    while sent < BATCHES && (seq - acked_upto) < (WINDOW * BATCH) as u64 {
                        let recs: Vec<Record> = (0..BATCH)
                            .map(|_| {
                                seq += 1;
                                record(seq, 1, (i as u64) << 32 | seq)
                            })
                            .collect();
                        tx.send(Message::Binary(
                            AgentMsg::Records(RecordBatch { records: recs })
                                .encode()
                                .into(),
                        ))
                        .await
                        .unwrap();
                        sent += 1;
                    }
                    match rx.next().await {
                        Some(Ok(Message::Binary(b))) => {
                            if let Ok(ControllerMsg::Ack { upto }) = ControllerMsg::decode(&b) {
                                acked_upto = acked_upto.max(upto);
                            }
                        }
                        Some(Ok(_)) => {}
                        other => panic!("agent {i}: connection ended: {other:?}"),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        t0.elapsed()
    });
    let rss = rss_kib(ctl.child.id());
    drop(ctl);
    // Zero loss: every acked record is in the database exactly once.
    let db = rusqlite::Connection::open(dir.path().join("data/hil.sqlite")).unwrap();
    let stored = db
        .query_row("SELECT count(*) FROM results", [], |r| r.get::<_, i64>(0))
        .unwrap() as u64;
    let ctl_rate = total as f64 / elapsed.as_secs_f64();

    // Baseline: the same rows straight into SQLite.
    let base_dir = tempfile::tempdir().unwrap();
    let mut conn = rusqlite::Connection::open(base_dir.path().join("raw.sqlite")).unwrap();
    controller::store::schema::configure(&conn).unwrap();
    controller::store::schema::migrate(&mut conn).unwrap();
    let rows: Vec<(String, Record)> = (0..AGENTS)
        .flat_map(|i| {
            (1..=(BATCHES * BATCH) as u64)
                .map(move |s| (format!("b{i}"), record(s, 1, (i as u64) << 32 | s)))
        })
        .collect();
    let t0 = Instant::now();
    let tx = conn.transaction().unwrap();
    {
        let mut st = tx
            .prepare_cached(controller::store::schema::INSERT_RESULT)
            .unwrap();
        for (b, r) in &rows {
            controller::store::schema::insert_result(&mut st, b, r).unwrap();
        }
    }
    tx.commit().unwrap();
    let raw_rate = total as f64 / t0.elapsed().as_secs_f64();

    println!("ingest: {AGENTS} agents x {BATCHES} batches x {BATCH} records = {total} records");
    println!(
        "controller: {ctl_rate:.0} records/s committed and acked ({:.2} s), stored {stored}, lost {}",
        elapsed.as_secs_f64(),
        total - stored.min(total)
    );
    println!("raw sqlite: {raw_rate:.0} records/s (same rows, one transaction)");
    println!(
        "ratio controller/raw: {:.2} (target >= 0.5)",
        ctl_rate / raw_rate
    );
    println!("controller RSS after run: {:.1} MiB", rss as f64 / 1024.0);
    assert_eq!(stored, total, "records lost or duplicated");
}
