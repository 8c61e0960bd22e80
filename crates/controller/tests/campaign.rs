//! Campaigns end to end on a real controller process with test agents over the real
//! websocket: exact per-stratum counts, and the same final report after the
//! controller is SIGKILLed and restarted, agents are killed and links are cut.

mod common;
use common::*;
use proto::wire::Outcome;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// (trials, failures, outcome counts) per stratum key.
type Counts = BTreeMap<String, (u64, u64, BTreeMap<String, u64>)>;

/// Expected (trials, failures, outcome counts) per stratum key, from the compiled list
/// and the test agents' deterministic physics.
fn expected(lab: &Lab, yaml: &str) -> (String, Counts) {
    let c = controller::campaign::compile("c.yaml", yaml, &lab.dir.path().join("models")).unwrap();
    let mut out: Counts = BTreeMap::new();
    for inj in &c.injections {
        let spec = proto::wire::TrialSpec {
            trial_id: inj.trial_id,
            attempt: 0,
            faults: inj.faults.clone(),
            voltages: inj.voltages.clone(),
        };
        let worst = c
            .plan
            .inputs
            .iter()
            .map(|i| outcome_for(&spec, *i))
            .max_by_key(|o| controller::scheduling::trial::severity(*o))
            .unwrap();
        let e = out
            .entry(c.strata[inj.stratum as usize].key.clone())
            .or_default();
        e.0 += 1;
        if worst.is_failure() {
            e.1 += 1;
        }
        *e.2.entry(worst.as_str().to_string()).or_default() += 1;
    }
    (c.hash, out)
}

fn observed(rep: &serde_json::Value) -> Counts {
    rep["strata"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let o: BTreeMap<String, u64> = serde_json::from_value(r["outcomes"].clone()).unwrap();
            (
                r["key"].as_str().unwrap().to_string(),
                (
                    r["trials"].as_u64().unwrap(),
                    r["failures"].as_u64().unwrap(),
                    o,
                ),
            )
        })
        .collect()
}

struct Agents {
    agents: Vec<Arc<TestAgent>>,
    stops: Vec<tokio::sync::watch::Sender<bool>>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

fn start_agents(lab: &Lab, boards: &[&str], delay_ms: u64) -> Agents {
    let mut a = Agents {
        agents: vec![],
        stops: vec![],
        handles: vec![],
    };
    for b in boards {
        let agent = Arc::new(TestAgent::new(b, &lab.ws_url(), delay_ms));
        let (tx, rx) = tokio::sync::watch::channel(false);
        let ag = agent.clone();
        a.handles
            .push(tokio::spawn(async move { ag.run(rx).await }));
        a.agents.push(agent);
        a.stops.push(tx);
    }
    a
}

impl Agents {
    async fn stop(self) {
        for s in &self.stops {
            let _ = s.send(true);
        }
        for h in self.handles {
            let _ = h.await;
        }
    }
}

async fn progress(c: &controller::client::Client, id: u64) -> u64 {
    c.json("GET", &format!("/api/campaigns/{id}"), None)
        .await
        .ok()
        .and_then(|v| v["live"]["done"].as_u64())
        .unwrap_or(0)
}

async fn wait_progress(c: &controller::client::Client, id: u64, at_least: u64) {
    for _ in 0..3000 {
        if progress(c, id).await >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("campaign {id} made no progress to {at_least}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_boards_complete_with_exact_counts() {
    let boards = ["b0", "b1", "b2"];
    let mut lab = Lab::new(&boards, "");
    lab.start();
    let agents = start_agents(&lab, &boards, 2);
    let yaml = campaign_yaml(11, 20);
    let (hash, want) = expected(&lab, &yaml);
    let op = lab.client(OPERATOR);
    let v = op.submit("c.yaml", yaml).await.unwrap();
    assert_eq!(
        v["hash"].as_str().unwrap(),
        hash,
        "stored list differs from a local compile"
    );
    let id = v["id"].as_u64().unwrap();
    assert_eq!(wait_finished(&op, id, || lab.log()).await, "done");
    let rep = op
        .json("GET", &format!("/api/campaigns/{id}/report"), None)
        .await
        .unwrap();
    assert_eq!(observed(&rep), want);
    assert_eq!(want.values().map(|v| v.0).sum::<u64>(), 60);
    assert!(
        want.values().any(|v| v.1 > 0),
        "the physics should produce some failures"
    );
    // Every board took part.
    for a in &agents.agents {
        assert!(a.state.lock().unwrap().ran > 0, "{} ran nothing", a.board);
    }
    // Exports hold each inference exactly once.
    let csv = op
        .call(
            "GET",
            &format!("/api/campaigns/{id}/export?format=csv"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&csv).lines().count(), 1 + 60 * 2);
    let jsonl = op
        .call(
            "GET",
            &format!("/api/campaigns/{id}/export?format=jsonl"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&jsonl).lines().count(), 60 * 2);
    let pq = op
        .call(
            "GET",
            &format!("/api/campaigns/{id}/export?format=parquet"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(&pq[..4], b"PAR1");
    let table = op
        .call(
            "GET",
            &format!("/api/campaigns/{id}/report?format=table"),
            None,
        )
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&table).contains("95% CI"));
    // Finished campaigns leave no per-campaign series behind.
    let m = controller::client::http_request("GET", &format!("{}/metrics", lab.url()), None, None)
        .await
        .unwrap()
        .1;
    let m = String::from_utf8_lossy(&m);
    assert!(!m.contains(&format!("campaign=\"{id}\"")), "{m}");
    assert!(
        m.contains("hil_inference_outcomes_total{model=\"m-a\",outcome=\"masked\"}"),
        "{m}"
    );
    agents.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disturbed_run_gives_the_same_report_as_an_undisturbed_one() {
    let boards = ["b0", "b1", "b2"];
    let yaml = campaign_yaml(23, 40); // 3 strata x 40 = 120 trials

    // Undisturbed reference run.
    let mut quiet = Lab::new(&boards, "");
    quiet.start();
    let agents = start_agents(&quiet, &boards, 5);
    let op = quiet.client(OPERATOR);
    let id = op.submit("c.yaml", yaml.clone()).await.unwrap()["id"]
        .as_u64()
        .unwrap();
    assert_eq!(wait_finished(&op, id, || quiet.log()).await, "done");
    let reference = op
        .json("GET", &format!("/api/campaigns/{id}/report"), None)
        .await
        .unwrap();
    agents.stop().await;
    let (_, want) = expected(&quiet, &yaml);
    assert_eq!(observed(&reference), want);

    // Disturbed run: same file and seed.
    let mut lab = Lab::new(&boards, "");
    lab.start();
    let agents = start_agents(&lab, &boards, 25);
    let op = lab.client(OPERATOR);
    let id = op.submit("c.yaml", yaml.clone()).await.unwrap()["id"]
        .as_u64()
        .unwrap();

    // 1. SIGKILL the controller mid-campaign, restart it on the same data dir.
    wait_progress(&op, id, 20).await;
    lab.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    lab.start();

    // 2. Kill an agent (its session dies, its durable spool and job survive) and bring
    //    it back.
    wait_progress(&op, id, 50).await;
    let Agents {
        agents: list,
        stops,
        handles,
    } = agents;
    let _ = stops[1].send(true);
    let mut handles = handles;
    let h1 = handles.remove(1);
    h1.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let a1 = list[1].clone();
    let h1 = tokio::spawn(async move { a1.run(rx).await });

    // 3. Cut another board's link: the session task is aborted mid-flight (no close
    //    frame), the agent reconnects on its own.
    wait_progress(&op, id, 80).await;
    let _ = stops[2].send(true);
    let h2 = handles.remove(1);
    h2.abort();
    let _ = h2.await;
    let (tx2, rx2) = tokio::sync::watch::channel(false);
    let a2 = list[2].clone();
    let h2 = tokio::spawn(async move { a2.run(rx2).await });

    assert_eq!(wait_finished(&op, id, || lab.log()).await, "done");
    let rep = op
        .json("GET", &format!("/api/campaigns/{id}/report"), None)
        .await
        .unwrap();
    assert_eq!(observed(&rep), observed(&reference));
    assert_eq!(rep["hash"], reference["hash"]);
    // No record lost or counted twice: one row per (trial, input) of the final attempt.
    let csv = op
        .call(
            "GET",
            &format!("/api/campaigns/{id}/export?format=csv"),
            None,
        )
        .await
        .unwrap();
    let rows = String::from_utf8_lossy(&csv).lines().count() - 1;
    assert_eq!(rows, 120 * 2, "records stored: {rows}");
    // The restarted controller rebuilt its state from the store, not from memory.
    assert!(
        lab.log().contains("campaign resumed from store"),
        "{}",
        lab.log()
    );

    let _ = tx.send(true);
    let _ = tx2.send(true);
    let _ = stops[0].send(true);
    let _ = h1.await;
    let _ = h2.await;
    for h in handles {
        let _ = h.await;
    }
    let _ = Outcome::Masked;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_priority() {
    let boards = ["b0"];
    let mut lab = Lab::new(&boards, "");
    lab.start();
    let op = lab.client(OPERATOR);
    let id = op.submit("c.yaml", campaign_yaml(5, 5)).await.unwrap()["id"]
        .as_u64()
        .unwrap();
    let v = op
        .json("POST", &format!("/api/campaigns/{id}/pause"), None)
        .await
        .unwrap();
    assert_eq!(v["state"], "paused");
    let e = op
        .json("POST", &format!("/api/campaigns/{id}/pause"), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cannot pause"), "{e}");
    // A paused campaign gets no board: a higher-priority one submitted later runs.
    let hi = campaign_yaml(6, 3).replace("seed: 6", "seed: 6\npriority: 90");
    let id2 = op.submit("hi.yaml", hi).await.unwrap()["id"]
        .as_u64()
        .unwrap();
    let agents = start_agents(&lab, &boards, 2);
    assert_eq!(wait_finished(&op, id2, || lab.log()).await, "done");
    let st = op
        .json("GET", &format!("/api/campaigns/{id}"), None)
        .await
        .unwrap();
    assert_eq!(st["state"], "paused");
    assert_eq!(st["live"]["done"], 0, "{st}");
    let v = op
        .json("POST", &format!("/api/campaigns/{id}/resume"), None)
        .await
        .unwrap();
    assert_eq!(v["state"], "running");
    assert_eq!(wait_finished(&op, id, || lab.log()).await, "done");
    let rep = op
        .json("GET", &format!("/api/campaigns/{id}/report"), None)
        .await
        .unwrap();
    assert_eq!(rep["trials"], 15);
    agents.stop().await;
}
