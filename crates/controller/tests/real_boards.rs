//! Acceptance runs with the real binaries: `hil-controller`, several `kv260-sim`
//! emulated boards and a `hil-agent` per board, all separate processes talking over
//! real sockets, consoles on real ptys and power through the emulator's power socket.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const OPERATOR: &str = "operator-token-1";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// kv260-sim and hil-agent from <workspace>/target/debug, built once if missing.
fn bins() -> (PathBuf, PathBuf) {
    let dir = repo().join("target/debug");
    let (sim, agent) = (dir.join("kv260-sim"), dir.join("hil-agent"));
    if !sim.exists() || !agent.exists() {
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "sim", "-p", "agent", "--bins"])
            .current_dir(repo())
            .status()
            .unwrap();
        assert!(st.success(), "building kv260-sim and hil-agent failed");
    }
    (sim, agent)
}

struct Procs(Vec<Child>);
impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Rig {
    dir: tempfile::TempDir,
    port: u16,
    n: usize,
    agent_bin: PathBuf,
    proxy: Option<Proxy>,
    /// sims, then the controller, then the agents; all die with the rig.
    procs: Procs,
}

/// A TCP relay between agents and the controller whose connections can be cut.
struct Proxy {
    port: u16,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        let conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> =
            Default::default();
        let c2 = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut a, _)) = l.accept().await {
                let h = tokio::spawn(async move {
                    if let Ok(mut b) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                });
                c2.lock().unwrap().push(h);
            }
        });
        Proxy { port, conns }
    }

    /// Drops every relayed connection at once, without a close handshake.
    fn cut(&self) {
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}

impl Rig {
    fn spawn_controller(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("controller.log"))
            .unwrap();
        Command::new(env!("CARGO_BIN_EXE_hil-controller"))
            .arg("--config")
            .arg(self.dir.path().join("controller.yaml"))
            .env("RUST_LOG", "info")
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn spawn_agent(&self, i: usize) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("agent{i}.log")))
            .unwrap();
        Command::new(&self.agent_bin)
            .arg("--config")
            .arg(self.dir.path().join(format!("agent{i}/agent.yaml")))
            .env("RUST_LOG", "info")
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// SIGKILL and restart the controller on the same data dir.
    fn restart_controller(&mut self) {
        let c = &mut self.procs.0[self.n];
        c.kill().unwrap();
        c.wait().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        self.procs.0[self.n] = self.spawn_controller();
    }

    /// SIGKILL and restart board `i`'s agent (its durable state dir survives).
    fn restart_agent(&mut self, i: usize) {
        let c = &mut self.procs.0[self.n + 1 + i];
        c.kill().unwrap();
        c.wait().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        self.procs.0[self.n + 1 + i] = self.spawn_agent(i);
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
    fn logs(&self) -> String {
        let mut s = self.log("controller");
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.ends_with(".log") && n != "controller.log" {
                s.push_str(&format!(
                    "\n===== {n}\n{}",
                    std::fs::read_to_string(e.path()).unwrap_or_default()
                ));
            }
        }
        s
    }
    fn client(&self) -> controller::client::Client {
        controller::client::Client::new(
            &format!("http://127.0.0.1:{}", self.port),
            Some(OPERATOR.into()),
        )
    }
}

fn start_rig(n: usize) -> Rig {
    start_rig_with(n, false)
}

fn start_rig_with(n: usize, via_proxy: bool) -> Rig {
    let (sim_bin, agent_bin) = bins();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let models = repo().join("board-images/models");
    // The emulated board file with a quick boot and a short minimum off time.
    let board_src =
        std::fs::read_to_string(repo().join("board-images/boards/kv260-sim.yaml")).unwrap();
    let head = board_src.split("\nsim:").next().unwrap();
    let board_file = d.join("kv260-sim-test.yaml");
    std::fs::write(
        &board_file,
        format!("{head}\nsim:\n  models_dir: {}\n  boot_ms: 400\n  min_off_ms: 200\n  printk_interval_s: 0\n", models.display()),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut procs = Procs(Vec::new());
    let mut boards_cfg = String::new();
    let mut tokens = String::new();
    let mut sims = Vec::new();
    for i in 0..n {
        let state = d.join(format!("sim{i}"));
        std::fs::create_dir_all(&state).unwrap();
        let log = std::fs::File::create(d.join(format!("sim{i}.log"))).unwrap();
        let mut child = Command::new(&sim_bin)
            .arg("--board")
            .arg(&board_file)
            .arg("--state-dir")
            .arg(&state)
            .arg("--seed")
            .arg(i.to_string())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let info: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("kv260-sim said {line:?}: {e}"));
        procs.0.push(child);
        boards_cfg.push_str(&format!(
            "  - id: b{i}\n    labels: {{kind: sim}}\n    console: {}\n    power: {{driver: sim, addr: {}, min_off_ms: 250}}\n",
            info["console"].as_str().unwrap(),
            info["power"].as_str().unwrap()
        ));
        tokens.push_str(&format!("    b{i}: board-token-{i}\n"));
        sims.push(state);
    }
    let cfg = format!(
        "listen: 127.0.0.1:{port}\ndata_dir: {}\nmodels_dir: {}\ntokens:\n  users:\n    - {{name: op, token: {OPERATOR}, role: operator}}\n  boards:\n{tokens}boards:\n{boards_cfg}timing:\n  heartbeat_ms: 500\n  chunk_size: 4\n  boot_wait_ms: 20000\n  reconnect_wait_ms: 15000\n",
        d.join("data").display(),
        models.display()
    );
    std::fs::write(d.join("controller.yaml"), cfg).unwrap();
    let log = std::fs::File::create(d.join("controller.log")).unwrap();
    procs.0.push(
        Command::new(env!("CARGO_BIN_EXE_hil-controller"))
            .arg("--config")
            .arg(d.join("controller.yaml"))
            .env("RUST_LOG", "info")
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    for _ in 0..600 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let proxy = via_proxy.then(|| Proxy::start(port));
    let agent_port = proxy.as_ref().map(|p| p.port).unwrap_or(port);
    for (i, state) in sims.iter().enumerate() {
        let adir = d.join(format!("agent{i}"));
        std::fs::create_dir_all(&adir).unwrap();
        std::fs::write(adir.join("token"), format!("board-token-{i}\n")).unwrap();
        std::fs::write(
            adir.join("agent.yaml"),
            format!(
                "controller_url: ws://127.0.0.1:{agent_port}/v1/agent\nboard_id: b{i}\ntoken_file: token\nboard_file: {}\nhw_root: {}\nmodels_dir: {}\nstate_dir: state\n",
                board_file.display(),
                state.display(),
                models.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(d.join(format!("agent{i}.log"))).unwrap();
        procs.0.push(
            Command::new(&agent_bin)
                .arg("--config")
                .arg(adir.join("agent.yaml"))
                .env("RUST_LOG", "info")
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }
    Rig {
        dir,
        port,
        n,
        agent_bin,
        proxy,
        procs,
    }
}

/// Until every board passed its first health check.
async fn wait_good(rig: &Rig, n: usize) {
    let c = rig.client();
    for _ in 0..3000 {
        if let Ok(v) = c.json("GET", "/api/boards", None).await
            && v.as_array()
                .is_some_and(|b| b.iter().filter(|x| x["health"] == "good").count() == n)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("boards never became good:\n{}", rig.logs());
}

/// Until every incident is closed.
async fn incidents_closed(rig: &Rig) -> Vec<serde_json::Value> {
    let c = rig.client();
    for _ in 0..3000 {
        let v = c.json("GET", "/api/incidents", None).await.unwrap();
        let v = v.as_array().unwrap().clone();
        if !v.is_empty() && v.iter().all(|i| !i["result"].is_null()) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("incidents never closed:\n{}", rig.logs());
}

async fn wait_done(rig: &Rig, id: u64) {
    let c = rig.client();
    for _ in 0..6000 {
        if let Ok(v) = c.json("GET", &format!("/api/campaigns/{id}"), None).await
            && matches!(
                v["state"].as_str(),
                Some("done" | "cancelled" | "timed_out")
            )
        {
            assert_eq!(v["state"], "done", "{v}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("campaign {id} did not finish:\n{}", rig.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_emulated_boards_complete_a_campaign() {
    let rig = start_rig(3);
    wait_good(&rig, 3).await;
    let c = rig.client();
    let yaml = "name: real3\nmodels: [tiny-relu-int8]\ninputs: [0]\nfault:\n  kind: bit_flip\n  targets: {tensor_kinds: [weight]}\nstrata: [model, layer]\nsizing: {method: fixed, count: 3}\nseed: 5\nboards: {labels: {kind: sim}}\n";
    let v = c
        .submit("real3.yaml", yaml.into())
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    let id = v["id"].as_u64().unwrap();
    let n = v["trials"].as_u64().unwrap();
    let strata = v["strata"].as_u64().unwrap();
    wait_done(&rig, id).await;
    let rep = c
        .json("GET", &format!("/api/campaigns/{id}/report"), None)
        .await
        .unwrap();
    let rows = rep["strata"].as_array().unwrap();
    assert_eq!(rows.len() as u64, strata);
    for r in rows {
        assert_eq!(r["trials"], 3, "{r}");
        let sum: u64 = r["outcomes"]
            .as_object()
            .unwrap()
            .values()
            .map(|x| x.as_u64().unwrap())
            .sum();
        assert_eq!(sum, 3, "{r}");
    }
    assert_eq!(rep["trials"].as_u64().unwrap(), n);
    let csv = c
        .call(
            "GET",
            &format!("/api/campaigns/{id}/export?format=csv"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&csv).lines().count() as u64, n + 1);
    let boards = c.json("GET", "/api/boards", None).await.unwrap();
    for b in boards.as_array().unwrap() {
        assert_eq!(b["health"], "good", "{b}");
    }
    // All three boards contributed.
    let mut used = std::collections::BTreeSet::new();
    for l in String::from_utf8_lossy(&csv).lines().skip(1) {
        used.insert(l.split(',').nth(4).unwrap().to_string());
    }
    assert_eq!(used.len(), 3, "boards used: {used:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undervolt_crash_is_recovered_and_counted_as_crash() {
    let rig = start_rig(1);
    let c = rig.client();
    // vccint 500 mV is below every emulated board's Vcrash (530 +- 10 mV).
    let yaml = "name: crash\nmodels: [tiny-relu-int8]\ninputs: [0]\nfault:\n  kind: bit_flip\n  targets: {tensor_kinds: [bias]}\nstrata: [model, voltage]\nvoltages: {vccint: [850, 500]}\nsizing: {method: fixed, count: 2}\nseed: 9\n";
    let v = c
        .submit("crash.yaml", yaml.into())
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    let id = v["id"].as_u64().unwrap();
    wait_done(&rig, id).await;
    let rep = c
        .json("GET", &format!("/api/campaigns/{id}/report"), None)
        .await
        .unwrap();
    let rows = rep["strata"].as_array().unwrap();
    let low = rows
        .iter()
        .find(|r| r["key"].as_str().unwrap().contains("vccint=500mV"))
        .unwrap();
    let nominal = rows
        .iter()
        .find(|r| r["key"].as_str().unwrap().contains("vccint=850mV"))
        .unwrap();
    assert_eq!(low["trials"], 2, "{low}\n{}", rig.logs());
    assert_eq!(low["outcomes"]["crash"], 2, "{low}");
    assert_eq!(nominal["trials"], 2, "{nominal}");
    assert!(nominal["outcomes"].get("crash").is_none(), "{nominal}");
    // Recovered through console signature + power cycle + health check; back to good.
    let inc = incidents_closed(&rig).await;
    assert!(inc.iter().all(|i| i["result"] == "recovered"), "{inc:?}");
    assert!(
        inc[0]["cause"].as_str().unwrap().contains("console"),
        "{inc:?}"
    );
    assert!(
        inc[0]["actions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "power_cycle"),
        "{inc:?}"
    );
    let bundle = PathBuf::from(inc[0]["bundle_dir"].as_str().unwrap());
    let tail = std::fs::read_to_string(bundle.join("console_at_incident.txt")).unwrap();
    assert!(tail.contains("Kernel panic"), "{tail}");
    assert!(bundle.join("console_tail.txt").exists());
    assert!(bundle.join("incident.json").exists());
    wait_good(&rig, 1).await;
    let m = controller::client::http_request(
        "GET",
        &format!("http://127.0.0.1:{}/metrics", rig.port),
        None,
        None,
    )
    .await
    .unwrap()
    .1;
    let m = String::from_utf8_lossy(&m);
    assert!(
        m.contains("hil_recoveries_total{action=\"power_cycle\",result=\"ok\"}"),
        "{m}"
    );
    if std::env::var_os("HIL_TEST_LOGS").is_some() {
        eprintln!("{}", rig.logs());
    }
}

async fn progress(rig: &Rig, id: u64) -> u64 {
    rig.client()
        .json("GET", &format!("/api/campaigns/{id}"), None)
        .await
        .ok()
        .and_then(|v| v["live"]["done"].as_u64())
        .unwrap_or(0)
}

async fn wait_progress(rig: &Rig, id: u64, at_least: u64) {
    for _ in 0..6000 {
        if progress(rig, id).await >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no progress to {at_least}:\n{}", rig.logs());
}

fn strata(rep: &serde_json::Value) -> Vec<(String, u64, u64, serde_json::Value)> {
    rep["strata"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_string(),
                r["trials"].as_u64().unwrap(),
                r["failures"].as_u64().unwrap(),
                r["outcomes"].clone(),
            )
        })
        .collect()
}

/// Nominal-voltage bit flips: outcomes do not depend on the board, so a run disturbed
/// by a controller SIGKILL + restart, an agent SIGKILL + restart and cut links must end
/// with exactly the report of an undisturbed run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_agents_survive_controller_kill_agent_kill_and_cut_links() {
    let yaml = "name: same\nmodels: [tiny-relu-int8]\ninputs: [0]\nfault:\n  kind: bit_flip\n  targets: {tensor_kinds: [weight]}\nstrata: [model, layer]\nsizing: {method: fixed, count: 4}\nseed: 77\n";
    let quiet = start_rig(3);
    wait_good(&quiet, 3).await;
    let id = quiet
        .client()
        .submit("same.yaml", yaml.into())
        .await
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    wait_done(&quiet, id).await;
    let reference = quiet
        .client()
        .json("GET", &format!("/api/campaigns/{id}/report"), None)
        .await
        .unwrap();
    drop(quiet);

    let mut rig = start_rig_with(3, true);
    wait_good(&rig, 3).await;
    let v = rig.client().submit("same.yaml", yaml.into()).await.unwrap();
    let id = v["id"].as_u64().unwrap();
    let total = v["trials"].as_u64().unwrap();
    wait_progress(&rig, id, total / 5).await;
    rig.restart_controller();
    wait_progress(&rig, id, total * 2 / 5).await;
    rig.restart_agent(1);
    wait_progress(&rig, id, total * 3 / 5).await;
    rig.proxy.as_ref().unwrap().cut();
    wait_done(&rig, id).await;
    let rep = rig
        .client()
        .json("GET", &format!("/api/campaigns/{id}/report"), None)
        .await
        .unwrap();
    assert_eq!(rep["hash"], reference["hash"]);
    assert_eq!(strata(&rep), strata(&reference), "{}", rig.logs());
    let csv = rig
        .client()
        .call(
            "GET",
            &format!("/api/campaigns/{id}/export?format=csv"),
            None,
        )
        .await
        .unwrap();
    let rows = String::from_utf8_lossy(&csv).lines().count() as u64 - 1;
    // One inference per trial in the final attempt; extra rows only from infra retries.
    assert!(rows >= total, "{rows} < {total}");
    let no_infra = String::from_utf8_lossy(&csv)
        .lines()
        .filter(|l| !l.contains(",infra_error,"))
        .count() as u64
        - 1;
    assert_eq!(no_infra, total, "records counted twice or lost");
    // The restart happened mid-campaign: state was rebuilt from the store.
    assert!(
        rig.log("controller")
            .contains("campaign resumed from store"),
        "{}",
        rig.logs()
    );
}
