//! `kv260-sim --board FILE --state-dir DIR --seed N [--models DIR]`: one emulated KV260.
//! Creates the memory file, hwmon tree, I2C socket, console pty and power socket in
//! DIR, prints one JSON line saying where they are, and runs until SIGTERM/SIGINT.

fn main() -> std::process::ExitCode {
    sim::cli::main_with_args(std::env::args_os())
}
