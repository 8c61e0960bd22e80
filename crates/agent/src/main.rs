//! `hil-agent`: parses the command line, sets up logging, and runs the agent.

fn main() -> std::process::ExitCode {
    agent::cli::main_with_args(std::env::args_os())
}
