//! 1,000 connected idle agents heartbeating once a second against a real
//! `hil-controller`: heartbeat round-trip p50/p99 and the controller's RSS.

#[path = "common.rs"]
mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use proto::wire::*;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const AGENTS: usize = 1000;
const ROUNDS: usize = 10;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = start(
        dir.path(),
        AGENTS,
        "  heartbeat_ms: 1000\n  offline_after_ms: 5000\n",
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rss_idle = rss_kib(ctl.child.id());
    let rtts = Arc::new(Mutex::new(Vec::<f64>::new()));
    let (rss_connected, peak) = rt.block_on(async {
        let mut conns = Vec::new();
        for i in 0..AGENTS {
            conns.push(connect(ctl.port, i).await);
        }
        let rss_connected = rss_kib(ctl.child.id());
        let mut tasks = Vec::new();
        for (i, ws) in conns.into_iter().enumerate() {
            let rtts = rtts.clone();
            tasks.push(tokio::spawn(async move {
                let (mut tx, mut rx) = ws.split();
                // Spread the agents over the second, as real agents drift apart.
                tokio::time::sleep(Duration::from_millis((i as u64 * 1000) / AGENTS as u64)).await;
                for seq in 1..=ROUNDS as u64 {
                    let t0 = Instant::now();
                    tx.send(Message::Binary(
                        AgentMsg::Heartbeat { seq, unix_ms: 0 }.encode().into(),
                    ))
                    .await
                    .unwrap();
                    loop {
                        match rx.next().await {
                            Some(Ok(Message::Binary(b))) => {
                                if let Ok(ControllerMsg::HeartbeatAck { seq: s }) =
                                    ControllerMsg::decode(&b)
                                    && s == seq
                                {
                                    break;
                                }
                            }
                            Some(Ok(_)) => {}
                            other => panic!("agent {i}: {other:?}"),
                        }
                    }
                    rtts.lock()
                        .unwrap()
                        .push(t0.elapsed().as_secs_f64() * 1000.0);
                    tokio::time::sleep(Duration::from_millis(1000).saturating_sub(t0.elapsed()))
                        .await;
                }
                (tx, rx)
            }));
        }
        let mut keep = Vec::new();
        for t in tasks {
            keep.push(t.await.unwrap());
        }
        let peak = rss_kib(ctl.child.id());
        drop(keep);
        (rss_connected, peak)
    });
    let mut v = rtts.lock().unwrap().clone();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    println!(
        "idle: {AGENTS} agents x {ROUNDS} heartbeats = {} round trips",
        v.len()
    );
    println!(
        "heartbeat RTT p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (target p99 < 100 ms)",
        pct(0.5),
        pct(0.99),
        v[v.len() - 1]
    );
    println!(
        "controller RSS: {:.1} MiB before agents, {:.1} MiB with {AGENTS} connected, {:.1} MiB after heartbeats (target < 256 MiB)",
        rss_idle as f64 / 1024.0,
        rss_connected as f64 / 1024.0,
        peak as f64 / 1024.0
    );
}
