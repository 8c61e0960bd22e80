//! `hilctl demo`: a whole lab on this machine. Starts emulated KV260 boards, a
//! controller and one agent per board as separate processes in a lab directory, submits
//! a campaign, shows live progress, and prints the report computed from the stored
//! records. The directory keeps everything afterwards: the SQLite store, the report
//! (`report.json`, `report.txt`), the records (`results.parquet`), every process's log,
//! and `lab.json` (URLs, token, campaign id) for scripts and tests.

mod lab;
pub mod roles;
pub mod view;

use crate::client::{Client, ClientError};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use lab::{Lab, y};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Lab directory to create (default: a new hil-demo-* directory under $TMPDIR).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Campaign to submit (default: campaigns/af-robustness.yaml of this checkout).
    #[arg(long)]
    pub campaign: Option<PathBuf>,
    /// Number of emulated boards.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub boards: u32,
    /// Keep the lab running after the report, for Prometheus and Grafana (Ctrl-C stops it).
    #[arg(long)]
    pub keep_running: bool,
    /// Print a progress line every few seconds instead of live bars (the default when
    /// stderr is not a terminal).
    #[arg(long)]
    pub plain: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}")]
    Lab(String),
    #[error("controller API: {0}")]
    Client(#[from] ClientError),
    #[error("interrupted (Ctrl-C); the lab directory keeps what was done: {0}")]
    Interrupted(String),
}

/// Physics seed of the i-th emulated board. Seeds 5, 10, 15 give boards whose timing
/// starts failing near 563 mV and that hang only below ~532 mV (see `boards/sim-N.json`),
/// so the bundled campaign's lowest set-point (540 mV) is in the faulty region on all
/// three without hanging them. Further boards continue the sequence.
fn board_seed(i: usize) -> u64 {
    5 * (i as u64 + 1)
}

/// The repository checkout the demo takes its board file, models and campaign from:
/// `HIL_REPO`, else the current directory if it is a checkout, else the one hilctl was
/// built from.
fn repo_root() -> PathBuf {
    if let Some(p) = std::env::var_os("HIL_REPO") {
        return PathBuf::from(p);
    }
    if let Ok(cwd) = std::env::current_dir()
        && cwd.join("board-images/boards/kv260-sim.yaml").is_file()
    {
        return cwd;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn abs(p: &Path) -> Result<PathBuf, DemoError> {
    p.canonicalize()
        .map_err(|e| DemoError::Io(p.display().to_string(), e))
}

fn lab_dir(arg: Option<&Path>) -> Result<PathBuf, DemoError> {
    let dir = match arg {
        Some(d) => d.to_path_buf(),
        None => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            std::env::temp_dir().join(format!("hil-demo-{t}-{}", std::process::id()))
        }
    };
    if dir.join("controller.yaml").exists() {
        return Err(DemoError::Lab(format!(
            "{} already holds a lab (controller.yaml); choose another --dir",
            dir.display()
        )));
    }
    for sub in ["logs", "boards", "agents", "controller"] {
        std::fs::create_dir_all(dir.join(sub))
            .map_err(|e| DemoError::Io(dir.join(sub).display().to_string(), e))?;
    }
    abs(&dir)
}

/// Runs the demo; returns when the campaign is reported (or, with `--keep-running`,
/// when interrupted).
pub fn run(args: DemoArgs) -> Result<(), DemoError> {
    let t0 = Instant::now();
    let repo = abs(&repo_root())?;
    let board_file = abs(&repo.join("board-images/boards/kv260-sim.yaml"))?;
    let models = abs(&repo.join("board-images/models"))?;
    let campaign = abs(&args
        .campaign
        .clone()
        .unwrap_or_else(|| repo.join("campaigns/af-robustness.yaml")))?;
    let dir = lab_dir(args.dir.as_deref())?;
    println!("Lab directory: {}", dir.display());

    let mut lab = Lab::default();
    let ids: Vec<String> = (1..=args.boards).map(|i| format!("sim-{i}")).collect();

    // 1. The emulated boards (each its own process, with its own undervolting seed).
    let mut sims = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let state = dir.join("boards").join(id);
        let info = lab.spawn_sim(
            &dir,
            id,
            &[
                "--board".into(),
                board_file.display().to_string(),
                "--state-dir".into(),
                state.display().to_string(),
                "--seed".into(),
                board_seed(i).to_string(),
                "--models".into(),
                models.display().to_string(),
            ],
        )?;
        sims.push((state, info));
    }
    for (id, (state, _)) in ids.iter().zip(&sims) {
        lab::wait_board_up(id, state, Duration::from_secs(60))?;
        lab.check()?;
    }
    println!("Started {} emulated KV260 boards (booted)", ids.len());

    // 2. The controller.
    let port = lab::free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let user_token = lab::token();
    let board_tokens: Vec<String> = ids.iter().map(|_| lab::token()).collect();
    let mut cfg = format!(
        "# Written by hilctl demo.\nlisten: {}\ndata_dir: {}\nmodels_dir: {}\ntokens:\n  boards:\n",
        y(format!("127.0.0.1:{port}")),
        y(dir.join("controller").display().to_string()),
        y(models.display().to_string())
    );
    for (id, t) in ids.iter().zip(&board_tokens) {
        cfg += &format!("    {id}: {}\n", y(t));
    }
    cfg += &format!(
        "  users:\n    - {{ name: demo, token: {}, role: operator }}\nboards:\n",
        y(&user_token)
    );
    for (id, (_, info)) in ids.iter().zip(&sims) {
        cfg += &format!(
            "  - id: {id}\n    labels: {{ type: kv260-sim }}\n    console: {}\n    power: {{ driver: sim, addr: {}, min_off_ms: 2000 }}\n",
            y(info.console_pty.display().to_string()),
            y(info.power.display().to_string())
        );
    }
    // The emulated board boots in ~3 s; do not wait a real board's minute for it.
    cfg += "timing:\n  boot_wait_ms: 20000\n  reconnect_wait_ms: 4000\n";
    let cfg_path = dir.join("controller.yaml");
    lab::write(&cfg_path, &cfg)?;
    lab.spawn(
        &dir,
        "controller",
        roles::CONTROLLER,
        &["--config".into(), cfg_path.display().to_string()],
    )?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DemoError::Io("building the runtime".into(), e))?;
    let client = Client::new(&url, Some(user_token.clone()));
    rt.block_on(wait_ready(&mut lab, &url))?;
    println!("Controller listening on {url}");

    // 3. One agent per board, dialling in with its token.
    for ((id, tok), (state, _)) in ids.iter().zip(&board_tokens).zip(&sims) {
        let adir = dir.join("agents").join(id);
        std::fs::create_dir_all(&adir).map_err(|e| DemoError::Io(adir.display().to_string(), e))?;
        lab::write(&adir.join("token"), &format!("{tok}\n"))?;
        let acfg = format!(
            "# Written by hilctl demo.\ncontroller_url: {}\nboard_id: {id}\ntoken_file: token\nboard_file: {}\nhw_root: {}\nmodels_dir: {}\nstate_dir: state\n",
            y(format!("ws://127.0.0.1:{port}{}", crate::link::PATH)),
            y(board_file.display().to_string()),
            y(state.display().to_string()),
            y(models.display().to_string()),
        );
        let p = adir.join("agent.yaml");
        lab::write(&p, &acfg)?;
        lab.spawn(
            &dir,
            &format!("agent-{id}"),
            roles::AGENT,
            &["--config".into(), p.display().to_string()],
        )?;
    }
    println!("Started {} agents", ids.len());

    // 4. The campaign.
    let yaml = std::fs::read_to_string(&campaign)
        .map_err(|e| DemoError::Io(campaign.display().to_string(), e))?;
    let sub = rt.block_on(client.submit(&campaign.display().to_string(), yaml))?;
    let id = sub["id"]
        .as_u64()
        .ok_or_else(|| DemoError::Lab(format!("submit returned no campaign id: {sub}")))?;
    println!(
        "Submitted {} as campaign {id}: {} trials in {} strata, injection list hash {}",
        campaign.display(),
        sub["trials"],
        sub["strata"],
        sub["hash"].as_str().unwrap_or("")
    );
    let lab_json = serde_json::json!({
        "dir": dir, "url": url, "metrics_url": format!("{url}/metrics"), "token": user_token,
        "campaign_id": id, "campaign_file": campaign, "boards": ids,
        "pids": lab.pids().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
    });
    lab::write(&dir.join("lab.json"), &format!("{lab_json:#}\n"))?;

    // 5. Live progress until the campaign ends.
    let live = !args.plain && std::io::stderr().is_terminal();
    let state = match rt.block_on(watch(&mut lab, &client, id, &ids, live)) {
        Err(DemoError::Interrupted(_)) => {
            return Err(DemoError::Interrupted(dir.display().to_string()));
        }
        r => r?,
    };

    // 6. The report, from the stored records; the records themselves as Parquet.
    let report = rt.block_on(client.json(
        "GET",
        &format!("/api/campaigns/{id}/report?format=json"),
        None,
    ))?;
    lab::write(&dir.join("report.json"), &format!("{report:#}\n"))?;
    let strata = rt.block_on(client.call(
        "GET",
        &format!("/api/campaigns/{id}/report?format=table"),
        None,
    ))?;
    lab::write(
        &dir.join("report-strata.txt"),
        &String::from_utf8_lossy(&strata),
    )?;
    let tables = view::report_tables(&report);
    lab::write(&dir.join("report.txt"), &tables)?;
    let parquet = rt.block_on(client.call(
        "GET",
        &format!("/api/campaigns/{id}/export?format=parquet"),
        None,
    ))?;
    let pq = dir.join("results.parquet");
    std::fs::write(&pq, &parquet).map_err(|e| DemoError::Io(pq.display().to_string(), e))?;

    println!("\n{tables}");
    let secs = t0.elapsed().as_secs();
    println!(
        "Campaign {id} {state}; demo took {}m{:02}s.",
        secs / 60,
        secs % 60
    );
    println!("Results in {}:", dir.display());
    println!("  report.txt, report.json          this report (report-strata.txt: every stratum)");
    println!("  results.parquet                  one row per inference: pandas.read_parquet(...)");
    println!("  controller/hil.sqlite            the store; logs/ every process's log");
    println!("Metrics (Prometheus text) while the lab is up:  curl {url}/metrics");
    println!(
        "Export again while the lab is up:  HIL_URL={url} HIL_TOKEN={user_token} hilctl export {id} --format parquet -o records.parquet"
    );
    if args.keep_running {
        println!(
            "The lab keeps running (--keep-running): point Prometheus at {url}/metrics (deploy/prometheus/), \
             use hilctl with HIL_URL/HIL_TOKEN above. Ctrl-C stops it."
        );
        rt.block_on(keep_running(&mut lab))?;
    }
    lab.stop();
    println!("Lab stopped.");
    Ok(())
}

async fn wait_ready(lab: &mut Lab, url: &str) -> Result<(), DemoError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        lab.check()?;
        if let Ok((200, _)) =
            crate::client::http_request("GET", &format!("{url}/healthz"), None, None).await
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DemoError::Lab(format!(
                "the controller did not answer on {url} within 60 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn keep_running(lab: &mut Lab) -> Result<(), DemoError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| DemoError::Io("installing a SIGTERM handler".into(), e))?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => lab.check()?,
        }
    }
}

/// Polls the campaign and the boards, drawing bars (terminal) or lines (logs), until the
/// campaign reaches a final state, which it returns.
async fn watch(
    lab: &mut Lab,
    c: &Client,
    id: u64,
    ids: &[String],
    live: bool,
) -> Result<String, DemoError> {
    let mp = MultiProgress::with_draw_target(if live {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let bar = mp.add(ProgressBar::new(1));
    bar.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:40.cyan/blue} {pos}/{len} trials ({percent}%) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // Plain text lines under the bar: outcome counts, then one line per board.
    let line = || {
        let pb = ProgressBar::new_spinner();
        pb.set_style(
            ProgressStyle::with_template("  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        pb
    };
    let counts = mp.add(line());
    let boards: Vec<ProgressBar> = ids.iter().map(|_| mp.add(line())).collect();
    let t0 = Instant::now();
    let mut last_line = Instant::now() - Duration::from_secs(60);
    let mut interrupt = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        lab.check()?;
        let v = c.json("GET", &format!("/api/campaigns/{id}"), None).await?;
        let state = v["state"].as_str().unwrap_or("?").to_string();
        let live_v = &v["live"];
        let (done, planned) = (
            live_v["done"].as_u64().unwrap_or(0),
            live_v["planned"].as_u64().unwrap_or(0),
        );
        bar.set_length(planned.max(1));
        bar.set_position(done);
        bar.set_message(state.clone());
        let oc = view::outcome_counts(live_v);
        counts.set_message(format!("inferences: {oc}"));
        let bv = c.json("GET", "/api/boards", None).await.unwrap_or_default();
        let lines: Vec<String> = bv
            .as_array()
            .map(|a| a.iter().map(view::board_line).collect())
            .unwrap_or_default();
        for (pb, l) in boards.iter().zip(&lines) {
            pb.set_message(l.clone());
        }
        if !live && last_line.elapsed() >= Duration::from_secs(5) {
            last_line = Instant::now();
            println!(
                "[{:>4}s] {state:<9} {done}/{planned} trials | {oc} | {}",
                t0.elapsed().as_secs(),
                lines
                    .iter()
                    .map(|l| l.split_whitespace().take(4).collect::<Vec<_>>().join(" "))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
        // A lab whose every board went bad cannot finish: say why instead of waiting.
        let healths: Vec<(&str, &str, &str)> = bv
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|b| {
                        (
                            b["id"].as_str().unwrap_or("?"),
                            b["health"].as_str().unwrap_or("?"),
                            b["health_reason"].as_str().unwrap_or(""),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !healths.is_empty()
            && healths
                .iter()
                .all(|(_, h, _)| matches!(*h, "bad" | "retired"))
        {
            let why: Vec<String> = healths
                .iter()
                .map(|(b, h, r)| format!("{b}: {h} ({r})"))
                .collect();
            return Err(DemoError::Lab(format!(
                "every board is out of service, the campaign cannot finish: {}; see the logs in the lab directory",
                why.join("; ")
            )));
        }
        if matches!(state.as_str(), "done" | "cancelled" | "timed_out") {
            bar.finish();
            counts.finish();
            for b in &boards {
                b.finish();
            }
            if !live {
                println!(
                    "[{:>4}s] {state} {done}/{planned} trials | {oc}",
                    t0.elapsed().as_secs()
                );
            }
            return Ok(state);
        }
        tokio::select! {
            _ = &mut interrupt => {
                return Err(DemoError::Interrupted(String::new()));
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
