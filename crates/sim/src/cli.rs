//! The `kv260-sim` command line as a library entry point, so `hilctl demo` can run the
//! very same code in its `__sim` role.

use std::path::PathBuf;

use crate::{Sim, SimConfig};
use anyhow::Context;
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};

#[derive(Parser, Debug)]
#[command(name = "kv260-sim", version, about = "Emulated Kria KV260 board")]
struct Args {
    /// Board description file (e.g. board-images/boards/kv260-sim.yaml).
    #[arg(long)]
    board: PathBuf,
    /// Directory for the memory file, hwmon tree, sockets and console link.
    #[arg(long)]
    state_dir: PathBuf,
    /// Seed of this board's physics (thresholds, upsets, noise).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Models directory (default: the board file's `sim.models_dir`).
    #[arg(long)]
    models: Option<PathBuf>,
    /// Log as JSON lines on stderr.
    #[arg(long)]
    log_json: bool,
}

fn run(args: Args) -> anyhow::Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    // Block the stop signals before any thread exists, so they all inherit the mask
    // and the main thread alone receives them with sigwait.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    stop.thread_block().context("blocking SIGINT/SIGTERM")?;

    let cfg = SimConfig {
        board_file: args.board.clone(),
        state_dir: args.state_dir.clone(),
        seed: args.seed,
        models_dir: args.models,
    };
    let handle = Sim::start(cfg)
        .with_context(|| format!("starting the board from {}", args.board.display()))?;
    let _span =
        tracing::info_span!("board", board = %handle.info().board, seed = args.seed).entered();
    println!(
        "{}",
        serde_json::to_string(handle.info()).context("encoding the info line")?
    );
    let sig = stop.wait().context("waiting for SIGINT/SIGTERM")?;
    tracing::info!(signal = ?sig, "stopping");
    handle.stop();
    Ok(())
}

/// What `kv260-sim` does: parse `args` (the first item is the program name), set up
/// logging, run the board until SIGTERM/SIGINT. Exit 1 on a startup error.
pub fn main_with_args<I, T>(args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    match run(Args::parse_from(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "kv260-sim failed");
            eprintln!("kv260-sim: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
