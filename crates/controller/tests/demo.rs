//! Whole-process test of `hilctl demo`: the real hilctl binary starts its lab (emulated
//! boards, controller, agents as separate processes), runs the bundled campaign and keeps
//! the lab up (`--keep-running`). Against that running lab:
//!   - Debian's real Prometheus scrapes it with the shipped scrape config and alert rules,
//!     and every Grafana panel query is evaluated through Prometheus's HTTP API
//!     (tools/check_panel_queries.py): an error or an empty result fails the test;
//!   - the report the demo printed is recomputed from the Parquet export with
//!     pandas/pyarrow (tools/recompute_report.py, python at $HIL_PYTHON) and must match,
//!     both for the demo's own `results.parquet` and for the export command it prints;
//!   - Ctrl-C stops every process of the lab and leaves the results in the directory.
//!
//! The deadlines below only stop a hung run; nothing asserts how fast it is.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn ci() -> bool {
    std::env::var("HIL_CI").is_ok_and(|v| v == "1")
}

/// A tool the test needs; in CI its absence is a failure, elsewhere that part is skipped.
fn tool(name: &str, found: Option<String>) -> Option<String> {
    if found.is_none() {
        assert!(!ci(), "{name} is missing (tools/test.sh installs it)");
        eprintln!("SKIPPING the {name} part: not installed (tools/test.sh installs it)");
    }
    found
}

fn which(bin: &str) -> Option<String> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
}

fn pandas_python() -> Option<String> {
    let candidates = [
        std::env::var("HIL_PYTHON").ok(),
        Some(repo().join("target/pyenv/bin/python").display().to_string()),
    ];
    candidates.into_iter().flatten().find(|py| {
        Command::new(py)
            .args(["-c", "import pandas, pyarrow"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// The demo under test: stopped (Ctrl-C, then SIGKILL) even when an assertion fails, so a
/// failed run leaves no lab behind.
struct Demo(Child);
impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(
    what: &str,
    demo: &mut Child,
    logs: &Path,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) {
    let t = Instant::now();
    while !done() {
        if let Ok(Some(st)) = demo.try_wait() {
            panic!(
                "the demo exited ({st}) before {what}\nstdout:\n{}\nstderr:\n{}",
                read(&logs.join("demo.out")),
                read(&logs.join("demo.err"))
            );
        }
        assert!(
            t.elapsed() < limit,
            "no {what} after {limit:?} (hang guard)\nstdout:\n{}\nstderr:\n{}",
            read(&logs.join("demo.out")),
            read(&logs.join("demo.err"))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    eprintln!("{what}: {}", text.trim());
    text
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn demo_lab_reports_from_records_and_serves_every_dashboard_query() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let logs = tmp.path();
    let repo = repo();
    let prometheus = tool("prometheus", which("prometheus"));
    let python = tool("pandas/pyarrow python ($HIL_PYTHON)", pandas_python());

    let t0 = Instant::now();
    let mut guard = Demo(
        Command::new(env!("CARGO_BIN_EXE_hilctl"))
            .args(["demo", "--keep-running", "--plain", "--dir"])
            .arg(&dir)
            .env("HIL_REPO", &repo)
            .current_dir(tmp.path())
            .stdout(std::fs::File::create(logs.join("demo.out")).unwrap())
            .stderr(std::fs::File::create(logs.join("demo.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    let demo = &mut guard.0;

    wait_for("lab.json", demo, logs, Duration::from_secs(300), || {
        dir.join("lab.json").exists()
    });
    let lab: serde_json::Value = serde_json::from_str(&read(&dir.join("lab.json"))).unwrap();
    let url = lab["url"].as_str().unwrap().to_string();
    let token = lab["token"].as_str().unwrap().to_string();
    let campaign = lab["campaign_id"].as_u64().unwrap();

    // Prometheus with the shipped scrape config and rules, pointed at this lab.
    let mut prom = None;
    let prom_start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let prom_port = free_port();
    if let Some(bin) = &prometheus {
        let shipped = read(&repo.join("deploy/prometheus/prometheus.yml"));
        let target = url.trim_start_matches("http://");
        let cfg = shipped
            .replace("\"127.0.0.1:8080\"", &format!("\"{target}\""))
            .replace("\"127.0.0.1:9090\"", &format!("\"127.0.0.1:{prom_port}\""))
            .replace("scrape_interval: 5s", "scrape_interval: 1s")
            .replace("evaluation_interval: 5s", "evaluation_interval: 1s")
            .replace(
                "  - rules/*.yml",
                &format!("  - {}/deploy/prometheus/rules/*.yml", repo.display()),
            );
        assert!(
            cfg.contains(target) && cfg.contains("scrape_interval: 1s"),
            "shipped prometheus.yml changed shape:\n{cfg}"
        );
        std::fs::write(logs.join("prometheus.yml"), cfg).unwrap();
        prom = Some(Killed(
            Command::new(bin)
                .arg(format!(
                    "--config.file={}",
                    logs.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    logs.join("tsdb").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
                .stdout(std::fs::File::create(logs.join("prometheus.log")).unwrap())
                .stderr(Stdio::from(
                    std::fs::File::create(logs.join("prometheus.err")).unwrap(),
                ))
                .spawn()
                .unwrap(),
        ));
    }

    // The campaign runs to its end; the demo prints the report and stays up.
    wait_for("the report", demo, logs, Duration::from_secs(900), || {
        read(&logs.join("demo.out")).contains("The lab keeps running")
    });
    let wall = t0.elapsed();
    let out = read(&logs.join("demo.out"));
    eprintln!("demo output:\n{out}\n(demo reached its report after {wall:?})");
    for heading in [
        "Failure rate by activation function and stage",
        "Failure rate vs voltage",
        "Most vulnerable layers",
        "Most vulnerable bit positions",
    ] {
        assert!(out.contains(heading), "report lacks {heading:?}");
    }
    let report: serde_json::Value = serde_json::from_str(&read(&dir.join("report.json"))).unwrap();
    assert_eq!(report["state"], "done", "{report:#}");
    let models: Vec<&str> = report["groups"]["model"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    for act in ["relu", "sigmoid", "hardsigmoid"] {
        for stage in ["fp32", "int8"] {
            let m = format!("model=tiny-{act}-{stage}");
            assert!(models.contains(&m.as_str()), "no {m} in {models:?}");
        }
    }
    assert!(report["trials"].as_u64().unwrap() > 0);

    // Every dashboard query against the live lab's metrics, as Grafana would ask them.
    if let Some(p) = &mut prom {
        std::thread::sleep(Duration::from_secs(3));
        if let Ok(Some(st)) = p.0.try_wait() {
            panic!(
                "prometheus exited ({st}): {}",
                read(&logs.join("prometheus.err"))
            );
        }
        let end = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        run_ok(
            Command::new("python3")
                .arg(repo.join("tools/check_panel_queries.py"))
                .arg(format!("http://127.0.0.1:{prom_port}"))
                .arg(format!("{prom_start:.0}"))
                .arg(format!("{end:.0}"))
                .arg("5s"),
            "dashboard panel queries",
        );
    }

    // The report, recomputed from the records alone.
    let again = dir.join("exported-again.parquet");
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_hilctl"))
            .args(["export", &campaign.to_string(), "--format", "parquet", "-o"])
            .arg(&again)
            .env("HIL_URL", &url)
            .env("HIL_TOKEN", &token),
        "hilctl export (the command the demo prints)",
    );
    if let Some(py) = &python {
        for pq in [dir.join("results.parquet"), again.clone()] {
            run_ok(
                Command::new(py)
                    .arg(repo.join("tools/recompute_report.py"))
                    .arg(&pq)
                    .arg(dir.join("report.json")),
                &format!("recompute the report from {}", pq.display()),
            );
        }
    }

    // Ctrl-C: every process of the lab stops; the results stay.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(st) = demo.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "demo did not stop after SIGINT (hang guard)"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    let _ = std::fs::File::open(logs.join("demo.err")).map(|mut f| f.read_to_string(&mut err));
    assert!(status.success(), "demo exit {status}\n{err}");
    assert!(read(&logs.join("demo.out")).contains("Lab stopped."));
    for (name, pid) in lab["pids"].as_object().unwrap() {
        let pid = nix::unistd::Pid::from_raw(pid.as_i64().unwrap() as i32);
        assert!(
            nix::sys::signal::kill(pid, None).is_err(),
            "{name} (pid {pid}) still running after the demo stopped"
        );
    }
    for f in [
        "controller/hil.sqlite",
        "report.txt",
        "report.json",
        "results.parquet",
        "logs/controller.log",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing from the lab directory");
    }
}
