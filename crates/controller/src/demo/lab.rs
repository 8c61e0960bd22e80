//! A lab on one machine: a directory, the processes in it, and their configuration files.
//! Every process gets its own log file under `logs/`; all are stopped (SIGTERM, then
//! SIGKILL after a grace period) when the [`Lab`] is dropped, agents first so they put the
//! boards back at nominal voltage while the controller still listens.

use super::DemoError;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

#[derive(Default)]
pub struct Lab {
    /// In start order; stopped in reverse.
    procs: Vec<Proc>,
}

/// Where one emulated board put its files (the first line `kv260-sim` prints).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SimInfo {
    pub console_pty: PathBuf,
    pub power: PathBuf,
}

impl Lab {
    /// Starts `hilctl ROLE ARGS...` with stderr (and stdout) in `logs/NAME.log`.
    pub fn spawn(
        &mut self,
        dir: &Path,
        name: &str,
        role: &str,
        args: &[String],
    ) -> Result<&mut Proc, DemoError> {
        let exe = std::env::current_exe()
            .map_err(|e| DemoError::Io("locating the hilctl executable".into(), e))?;
        let log = dir.join("logs").join(format!("{name}.log"));
        let f = File::create(&log).map_err(|e| DemoError::Io(log.display().to_string(), e))?;
        let f2 = f
            .try_clone()
            .map_err(|e| DemoError::Io(log.display().to_string(), e))?;
        let child = Command::new(exe)
            .arg(role)
            .args(args)
            .stdin(Stdio::null())
            .stdout(if role == super::roles::SIM {
                Stdio::piped()
            } else {
                Stdio::from(f2)
            })
            .stderr(Stdio::from(f))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            // Logs go to files: no colour codes in them.
            .env("NO_COLOR", "1")
            .spawn()
            .map_err(|e| DemoError::Io(format!("starting {name}"), e))?;
        self.procs.push(Proc {
            name: name.to_string(),
            child,
            log,
        });
        Ok(self.procs.last_mut().expect("just pushed"))
    }

    /// Starts an emulated board and waits for its info line.
    pub fn spawn_sim(
        &mut self,
        dir: &Path,
        name: &str,
        args: &[String],
    ) -> Result<SimInfo, DemoError> {
        let p = self.spawn(dir, name, super::roles::SIM, args)?;
        let out = p
            .child
            .stdout
            .take()
            .ok_or_else(|| DemoError::Lab(format!("{name}: no stdout")))?;
        let log = p.log.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        // Read the info line, then keep draining stdout into the log so the board never
        // blocks on a full pipe.
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&log) {
                let _ = std::io::copy(&mut r, &mut f);
                let _ = f.flush();
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).map_err(|_| {
            DemoError::Lab(format!(
                "{name} did not start within 60 s: see {}",
                self.log_of(name)
            ))
        })?;
        // Keep it: it holds this board's undervolting thresholds, what a lab would measure.
        write(&dir.join("boards").join(format!("{name}.json")), &line)?;
        serde_json::from_str(line.trim()).map_err(|e| {
            DemoError::Lab(format!(
                "{name} did not report where its files are ({e}): see {}",
                self.log_of(name)
            ))
        })
    }

    fn log_of(&self, name: &str) -> String {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.log.display().to_string())
            .unwrap_or_default()
    }

    /// The first process that has exited, if any: a lab with a dead member is broken.
    pub fn check(&mut self) -> Result<(), DemoError> {
        for p in &mut self.procs {
            if let Ok(Some(st)) = p.child.try_wait() {
                return Err(DemoError::Lab(format!(
                    "{} exited ({st}); its log: {}\n{}",
                    p.name,
                    p.log.display(),
                    tail(&p.log, 15)
                )));
            }
        }
        Ok(())
    }

    pub fn pids(&self) -> Vec<(String, u32)> {
        self.procs
            .iter()
            .map(|p| (p.name.clone(), p.child.id()))
            .collect()
    }

    /// SIGTERM in reverse start order... except agents go first, so they restore nominal
    /// voltages on boards that are still up.
    pub fn stop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let mut order: Vec<usize> = (0..self.procs.len()).rev().collect();
        order.sort_by_key(|i| !self.procs[*i].name.starts_with("agent"));
        for group in [true, false] {
            let idx: Vec<usize> = order
                .iter()
                .copied()
                .filter(|i| self.procs[*i].name.starts_with("agent") == group)
                .collect();
            for i in &idx {
                let _ = kill(
                    Pid::from_raw(self.procs[*i].child.id() as i32),
                    Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            for i in &idx {
                let p = &mut self.procs[*i];
                loop {
                    match p.child.try_wait() {
                        Ok(Some(_)) | Err(_) => break,
                        Ok(None) if Instant::now() >= deadline => {
                            let _ = p.child.kill();
                            let _ = p.child.wait();
                            break;
                        }
                        Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            }
        }
        self.procs.clear();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Last `n` lines of a log, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until a booted board answers on its I2C socket (the emulator listens once the
/// board is up, after its boot log), so agents do not meet a board still booting.
pub fn wait_board_up(name: &str, state_dir: &Path, limit: Duration) -> Result<(), DemoError> {
    let sock = state_dir.join("i2c-1.sock");
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if t.elapsed() > limit {
            return Err(DemoError::Lab(format!(
                "{name} did not boot within {limit:?} ({} never answered)",
                sock.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A free TCP port on loopback (bind port 0, read it, release it).
pub fn free_port() -> Result<u16, DemoError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| DemoError::Io("finding a free port".into(), e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| DemoError::Io("finding a free port".into(), e))
}

/// A random token (hex), for boards and the demo user.
pub fn token() -> String {
    use rand::Rng;
    let b: [u8; 24] = rand::rng().random();
    hex::encode(b)
}

/// YAML string literal (double-quoted, escaped): paths may contain anything.
pub fn y(s: impl AsRef<str>) -> String {
    serde_json::to_string(s.as_ref()).unwrap_or_else(|_| "\"\"".into())
}

pub fn write(path: &Path, text: &str) -> Result<(), DemoError> {
    std::fs::write(path, text).map_err(|e| DemoError::Io(path.display().to_string(), e))
}
