//! Shared by the benchmarks: a real `hil-controller` process and a minimal agent.

#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use proto::wire::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use tokio_tungstenite::tungstenite::Message;

pub struct Controller {
    pub child: Child,
    pub port: u16,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start(dir: &Path, boards: usize, timing: &str) -> Controller {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let mut cfg = format!(
        "listen: 127.0.0.1:{port}\ndata_dir: {}\nmodels_dir: {}\ntokens:\n  boards:\n",
        dir.join("data").display(),
        models.display()
    );
    for i in 0..boards {
        cfg.push_str(&format!("    b{i}: tok-{i}\n"));
    }
    cfg.push_str(&format!("timing:\n{timing}"));
    let path = dir.join("controller.yaml");
    std::fs::write(&path, cfg).unwrap();
    #[allow(clippy::zombie_processes)] // waited for in Controller's Drop
    let child = Command::new(env!("CARGO_BIN_EXE_hil-controller"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..600 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Controller { child, port };
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("controller did not start");
}

pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects board `i` and completes Hello/Welcome. The agent advertises no models, so
/// the controller never gives it work (its health check cannot run).
pub async fn connect(port: u16, i: usize) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/v1/agent"))
        .await
        .unwrap();
    let hello = AgentMsg::Hello(Hello {
        proto_version: PROTO_VERSION,
        proto_min_version: PROTO_MIN_VERSION,
        agent_version: "bench".into(),
        board_id: format!("b{i}"),
        token: format!("tok-{i}"),
        capabilities: Capabilities::default(),
        features: features::ALL_V1.iter().map(|s| s.to_string()).collect(),
        spool_head: 0,
        active_job: None,
    });
    ws.send(Message::Binary(hello.encode().into()))
        .await
        .unwrap();
    loop {
        let m = ws.next().await.unwrap().unwrap();
        if let Message::Binary(b) = m
            && let Ok(ControllerMsg::Welcome(_)) = ControllerMsg::decode(&b)
        {
            return ws;
        }
    }
}

pub fn record(seq: u64, campaign: u64, trial: u64) -> Record {
    Record {
        seq,
        job_id: 1,
        campaign_id: campaign,
        trial_id: trial,
        attempt: 0,
        input: 0,
        outcome: if trial.is_multiple_of(7) {
            Outcome::SdcCritical
        } else {
            Outcome::Masked
        },
        mismatched_pixels: (trial % 13) as u32,
        nonfinite: 0,
        iou_vs_golden: 0.97,
        iou_vs_truth: 0.81,
        golden_iou_vs_truth: 0.82,
        latency_ns: 1_234_567,
        cycles: 370_000,
        power_w: 3.21,
        vccint_mv: 850.0,
        temp_c: 45.5,
        start_unix_ns: 1_700_000_000_000_000_000 + trial,
        end_unix_ns: 1_700_000_000_001_000_000 + trial,
        detail: None,
    }
}
