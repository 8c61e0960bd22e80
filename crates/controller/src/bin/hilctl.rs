//! hilctl: command-line client of the controller.

use clap::{Parser, Subcommand};
use controller::cli;

#[derive(Parser)]
#[command(
    version,
    about = "KV260 robustness lab: submit campaigns, watch them, read reports"
)]
struct Args {
    #[command(flatten)]
    global: cli::Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    #[command(flatten)]
    Lab(cli::Command),
    /// Run a whole lab here: a controller, emulated KV260 boards and their agents, a
    /// campaign (campaigns/af-robustness.yaml), live progress and the report.
    Demo(controller::demo::DemoArgs),
}

fn main() -> std::process::ExitCode {
    // `hilctl __sim|__agent|__controller ...`: one process of a `hilctl demo` lab.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(code) = controller::demo::roles::dispatch(&argv) {
        return code;
    }
    match hilctl() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line; no backtrace for a user-facing error.
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn hilctl() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.cmd {
        Cmd::Demo(d) => controller::demo::run(d)?,
        Cmd::Lab(c) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(cli::run(&args.global, c))?
        }
    }
    Ok(())
}
