//! The processes of a demo lab. `cargo run --bin hilctl` builds only this package, so
//! `hilctl demo` starts each part of the lab by re-executing itself with a hidden role
//! as the first argument: `hilctl __sim ...`, `hilctl __agent ...`, `hilctl __controller
//! ...`. Each role takes the same flags as the real binary (`kv260-sim`, `hil-agent`,
//! `hil-controller`) and runs the same library code, in its own process.

use clap::Parser;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

pub const SIM: &str = "__sim";
pub const AGENT: &str = "__agent";
pub const CONTROLLER: &str = "__controller";

/// Runs the role named by `args[1]`, if any; `None` means "not a role, carry on as hilctl".
pub fn dispatch(args: &[OsString]) -> Option<ExitCode> {
    let role = args.get(1)?.to_str()?;
    let rest = || std::iter::once(OsString::from(role)).chain(args[2..].iter().cloned());
    match role {
        SIM => Some(sim(rest())),
        AGENT => Some(agent(rest())),
        CONTROLLER => Some(controller(rest())),
        _ => None,
    }
}

fn init_logs(json: bool) {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(std::io::stderr);
    if json {
        sub.json().init();
    } else {
        sub.init();
    }
}

/// A demo process must not outlive `hilctl demo`, even when that is SIGKILLed: once our
/// parent is gone we send ourselves SIGTERM, so each role shuts down its usual way (the
/// agent restores nominal voltages first).
fn exit_with_parent() {
    let parent = nix::unistd::getppid();
    std::thread::Builder::new()
        .name("parent-watch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_millis(500));
                if nix::unistd::getppid() != parent {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::getpid(),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                    return;
                }
            }
        })
        .ok();
}

fn fail(role: &str, e: impl std::fmt::Display) -> ExitCode {
    tracing::error!(role, error = %e, "demo process failed");
    eprintln!("{role}: {e}");
    ExitCode::FAILURE
}

#[derive(Parser, Debug)]
#[command(name = "kv260-sim")]
struct SimArgs {
    #[arg(long)]
    board: PathBuf,
    #[arg(long)]
    state_dir: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    models: Option<PathBuf>,
    #[arg(long)]
    log_json: bool,
}

/// `kv260-sim`, as its binary runs it: start, print the info line, wait for a stop signal.
fn sim(args: impl Iterator<Item = OsString>) -> ExitCode {
    use nix::sys::signal::{SigSet, Signal};
    let a = match SimArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    init_logs(a.log_json);
    // Block the stop signals before any thread exists so the main thread alone takes them.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    if let Err(e) = stop.thread_block() {
        return fail(SIM, format!("blocking SIGINT/SIGTERM: {e}"));
    }
    exit_with_parent();
    let cfg = sim::SimConfig {
        board_file: a.board.clone(),
        state_dir: a.state_dir,
        seed: a.seed,
        models_dir: a.models,
    };
    let handle = match sim::Sim::start(cfg) {
        Ok(h) => h,
        Err(e) => {
            return fail(
                SIM,
                format!("starting the board from {}: {e}", a.board.display()),
            );
        }
    };
    match serde_json::to_string(handle.info()) {
        Ok(line) => println!("{line}"),
        Err(e) => return fail(SIM, e),
    }
    let sig = stop.wait();
    tracing::info!(signal = ?sig, "stopping");
    handle.stop();
    ExitCode::SUCCESS
}

/// `hil-agent`, through the agent library's own entry point.
fn agent(args: impl Iterator<Item = OsString>) -> ExitCode {
    exit_with_parent();
    agent::cli::main_with_args(args)
}

#[derive(Parser, Debug)]
#[command(name = "hil-controller")]
struct ControllerArgs {
    #[arg(short, long)]
    config: PathBuf,
}

/// `hil-controller`: serve until SIGTERM/SIGINT.
fn controller(args: impl Iterator<Item = OsString>) -> ExitCode {
    let a = match ControllerArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    init_logs(false);
    exit_with_parent();
    let cfg = match crate::config::Config::load(&a.config) {
        Ok(c) => c,
        Err(e) => return fail(CONTROLLER, e),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(CONTROLLER, e),
    };
    rt.block_on(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => return fail(CONTROLLER, e),
            };
        tokio::select! {
            r = crate::server::run(cfg, None) => match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(CONTROLLER, e),
            },
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); ExitCode::SUCCESS }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping"); ExitCode::SUCCESS }
        }
    })
}
