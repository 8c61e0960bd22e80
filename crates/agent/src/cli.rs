//! The `hil-agent` command line as a library entry point, so `hilctl demo` can run the
//! very same code in its `__agent` role.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;

use crate::config::Config;
use crate::link::{Link, spool::Spool};
use crate::safety::{Restorer, install_panic_hook};
use crate::trial::worker::{Cmd, Shared, Worker};

#[derive(Debug, Parser)]
#[command(
    name = "hil-agent",
    version,
    about = "KV260 robustness lab board agent"
)]
struct Args {
    /// Agent config (YAML).
    #[arg(long, short, default_value = "/etc/hil-agent/agent.yaml")]
    config: PathBuf,
    /// Log as JSON lines (for journald / log shipping).
    #[arg(long)]
    log_json: bool,
}

/// What `hil-agent` does: parse `args` (the first item is the program name), set up
/// logging, run until SIGTERM/SIGINT. Exit 78 (EX_CONFIG) on a startup error.
pub fn main_with_args<I, T>(args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = Args::parse_from(args);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_json {
        sub.json().init();
    } else {
        sub.init();
    }
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "hil-agent failed");
            // 78 = EX_CONFIG: systemd (RestartPreventExitStatus) does not loop on it.
            std::process::ExitCode::from(78)
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config)?;
    let token = cfg.token()?;
    let file = proto::board::BoardFile::load(&cfg.board_file)?;
    let restorer = Restorer::new(file.clone(), &cfg.hw_root);
    install_panic_hook(restorer.clone());
    // A previous run may have been killed mid-trial (SIGKILL cannot be caught): start
    // from the safe state.
    for (rail, e) in restorer.restore_nominal() {
        tracing::warn!(rail = %rail, error = %e, "Could not restore nominal at start (board down?)");
    }
    let spool = Spool::open(&cfg.state_dir.join("spool"), cfg.spool_max_bytes)
        .context("opening the record spool")?;
    tracing::info!(board_id = %cfg.board_id, spool_head = spool.head(), acked = spool.acked_upto(), "hil-agent starting");
    let spool = Arc::new(Mutex::new(spool));
    let wake = Arc::new(tokio::sync::Notify::new());
    let shared = Arc::new(Shared::default());
    let (ev_tx, ev_rx) = tokio::sync::mpsc::unbounded_channel();
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel();
    let worker = Worker::new(
        cfg.clone(),
        spool.clone(),
        wake.clone(),
        ev_tx,
        shared.clone(),
    );
    let handle = std::thread::Builder::new()
        .name("trial-loop".into())
        .spawn(move || worker.run(cmd_rx))
        .context("spawning the trial loop")?;
    let sensors = crate::board::Sensors::open(&file, &cfg.hw_root).ok();
    let link = Link {
        capabilities: crate::capabilities(&file, &cfg.models_dir),
        cfg,
        token,
        spool,
        wake,
        events: ev_rx,
        cmds: cmd_tx.clone(),
        shared,
        sensors,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    rt.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
            }
        };
        link.run(shutdown).await;
    });
    // The trial loop finishes its current inference, commits, restores nominal.
    let _ = cmd_tx.send(Cmd::Shutdown);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = handle.join();
        let _ = done_tx.send(());
    });
    if done_rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .is_err()
    {
        tracing::error!("Trial loop did not stop in 20 s; restoring nominal directly");
    }
    // Belt and braces: every exit path ends at nominal.
    for (rail, e) in restorer.restore_nominal() {
        tracing::error!(rail = %rail, error = %e, "Could not restore nominal at exit");
    }
    tracing::info!("hil-agent stopped");
    Ok(())
}
