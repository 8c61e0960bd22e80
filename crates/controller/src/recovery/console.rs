//! Per-board serial consoles, read continuously into `consoles/<board>.log` with a
//! tail kept in memory for post-mortem bundles. Crash signatures trigger recovery
//! at once (fail-fast) instead of waiting for timeouts.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

const TAIL_LINES: usize = 200;

/// Lines that mean the board's OS or fabric died.
pub const SIGNATURES: &[&str] = &[
    "Kernel panic",
    "Internal error: Oops",
    "Oops:",
    "SError",
    "watchdog: BUG",
    "watchdog: Watchdog detected hard LOCKUP",
    "watchdog timeout",
    "Watchdog timeout",
];

pub fn match_signature(line: &str) -> Option<&'static str> {
    SIGNATURES.iter().copied().find(|s| line.contains(s))
}

#[derive(Clone, Default)]
pub struct Consoles {
    tails: Arc<Mutex<HashMap<String, VecDeque<String>>>>,
    /// Last time a login prompt was seen: the OS finished booting.
    prompts: Arc<Mutex<HashMap<String, u64>>>,
    /// Crash-signature lines seen so far, per board.
    crashes: Arc<Mutex<HashMap<String, u64>>>,
}

impl Consoles {
    pub fn has(&self, board: &str) -> bool {
        self.tails
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(board)
    }

    /// How many crash-signature lines the board printed so far.
    pub fn crash_count(&self, board: &str) -> u64 {
        self.crashes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(board)
            .copied()
            .unwrap_or(0)
    }

    /// When the board last showed a login prompt (unix ms), if ever.
    pub fn prompt_seen(&self, board: &str) -> Option<u64> {
        self.prompts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(board)
            .copied()
    }

    pub fn tail(&self, board: &str) -> Vec<String> {
        self.tails
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(board)
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn push(&self, board: &str, line: String) {
        let mut m = self.tails.lock().unwrap_or_else(|p| p.into_inner());
        let t = m.entry(board.to_string()).or_default();
        if t.len() >= TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line);
    }

    /// Starts a reader thread for `board`. `on_crash(signature, line)` is called for
    /// every line matching a crash signature. The port is re-opened when it goes away
    /// (a power-cycled board's USB-UART, or the emulator's pty being recreated).
    pub fn spawn(
        &self,
        board: String,
        device: PathBuf,
        baud: u32,
        log_dir: PathBuf,
        on_crash: impl Fn(&'static str, String) + Send + 'static,
    ) {
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name(format!("console-{board}"))
            .spawn(move || {
                let _ = std::fs::create_dir_all(&log_dir);
                let log_path = log_dir.join(format!("{board}.log"));
                let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).ok();
                me.tails.lock().unwrap_or_else(|p| p.into_inner()).entry(board.clone()).or_default();
                let mut partial = Vec::<u8>::new();
                let mut warned = false;
                loop {
                    let port = serialport::new(device.to_string_lossy(), baud)
                        .timeout(std::time::Duration::from_millis(500))
                        .open_native();
                    let mut port = match port {
                        Ok(p) => {
                            warned = false;
                            p
                        }
                        Err(e) => {
                            if !warned {
                                tracing::warn!(board, device = %device.display(), error = %e, "console not available; retrying");
                                warned = true;
                            }
                            std::thread::sleep(std::time::Duration::from_secs(1));
                            continue;
                        }
                    };
                    let mut buf = [0u8; 4096];
                    loop {
                        match port.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                if let Some(l) = log.as_mut() {
                                    let _ = l.write_all(&buf[..n]);
                                }
                                partial.extend_from_slice(&buf[..n]);
                                while let Some(pos) = partial.iter().position(|b| *b == b'\n') {
                                    let line: Vec<u8> = partial.drain(..=pos).collect();
                                    let line = String::from_utf8_lossy(&line).trim_end().to_string();
                                    me.push(&board, line.clone());
                                    if let Some(sig) = match_signature(&line) {
                                        tracing::warn!(board, signature = sig, %line, "crash signature on console");
                                        *me.crashes
                                            .lock()
                                            .unwrap_or_else(|p| p.into_inner())
                                            .entry(board.clone())
                                            .or_default() += 1;
                                        on_crash(sig, line.clone());
                                    }
                                }
                                // A login prompt has no newline after it.
                                if partial.windows(6).any(|w| w == b"login:") {
                                    me.prompts
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .insert(board.clone(), crate::store::now_ms());
                                }
                                if partial.len() > 64 * 1024 {
                                    partial.clear(); // a console without newlines: keep memory bounded
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures() {
        assert_eq!(
            match_signature("[  12.3] Kernel panic - not syncing: Fatal exception"),
            Some("Kernel panic")
        );
        assert_eq!(
            match_signature("SError Interrupt on CPU1, code 0xbf000000"),
            Some("SError")
        );
        assert_eq!(
            match_signature("Internal error: Oops: 96000004 [#1] SMP"),
            Some("Internal error: Oops")
        );
        assert_eq!(match_signature("hil-agent: trial 12 done"), None);
    }
}
