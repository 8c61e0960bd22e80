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

/// `kv260-sim`, through the sim library's own entry point.
fn sim(args: impl Iterator<Item = OsString>) -> ExitCode {
    use nix::sys::signal::{SigSet, Signal};
    // Block the stop signals before the parent-watch thread exists, so the sim's main
    // thread alone takes them (main_with_args blocks them again, harmlessly).
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    if let Err(e) = stop.thread_block() {
        return fail(SIM, format!("blocking SIGINT/SIGTERM: {e}"));
    }
    exit_with_parent();
    sim::cli::main_with_args(args)
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
