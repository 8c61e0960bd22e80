//! The lab power switch (a network PDU or relay on the 12 V barrel input) as a Unix
//! socket with a line protocol. One command per line, one reply line each:
//!
//! | command | reply | effect |
//! |---|---|---|
//! | `on` | `ok on` | outlet on (boots, or stays locked after a too-short off) |
//! | `off` | `ok off` | outlet off: DDR, registers, regulator settings lost |
//! | `cycle [OFF_MS]` | `ok on` | off, wait OFF_MS (default 2.5 x min_off_ms), on |
//! | `status` | `ok on` / `ok off` | what the outlet is doing (a PDU knows no more) |
//! | `ambient [DEGC]` | `ok ambient DEGC` | thermal-chamber extension: read or set ambient |
//!
//! Anything else: `err <why>`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::board::{Shared, lock};

pub fn run(sh: Arc<Shared>, path: PathBuf) {
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot bind the power socket");
            return;
        }
    };
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    while !sh.stopping() {
        match listener.accept() {
            Ok((s, _)) => {
                let sh = sh.clone();
                std::thread::spawn(move || serve(sh, s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn serve(sh: Arc<Shared>, s: UnixStream) {
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        // Bounded read: a client that never sends a newline cannot make us buffer forever.
        match (&mut r).take(257).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) if n > 256 => {
                let _ = w.write_all(b"err line too long (max 256 bytes)\n");
                return;
            }
            Ok(_) => {}
        }
        let reply = command(&sh, line.trim());
        if w.write_all(format!("{reply}\n").as_bytes()).is_err() {
            return;
        }
    }
}

pub fn command(sh: &Shared, line: &str) -> String {
    let mut it = line.split_whitespace();
    let cmd = it.next().unwrap_or("");
    let arg = it.next();
    if it.next().is_some() {
        return format!("err too many arguments in {line:?}");
    }
    match (cmd, arg) {
        ("on", None) => {
            sh.power_on();
            "ok on".into()
        }
        ("off", None) => {
            sh.power_off();
            "ok off".into()
        }
        ("cycle", a) => {
            let ms = match a.map(str::parse::<u64>) {
                None => sh.p.min_off_ms * 5 / 2,
                Some(Ok(ms)) if ms <= 600_000 => ms,
                Some(_) => {
                    return format!(
                        "err cycle: OFF_MS must be an integer 0..=600000, got {:?}",
                        a.unwrap_or("")
                    );
                }
            };
            sh.power_off();
            std::thread::sleep(Duration::from_millis(ms));
            sh.power_on();
            "ok on".into()
        }
        ("status", None) => {
            if lock(&sh.life).outlet_on {
                "ok on".into()
            } else {
                "ok off".into()
            }
        }
        ("ambient", None) => format!("ok ambient {:.1}", sh.ambient()),
        ("ambient", Some(a)) => match a.parse::<f64>() {
            Ok(t) if (-40.0..=125.0).contains(&t) => {
                *lock(&sh.ambient_c) = t;
                format!("ok ambient {t:.1}")
            }
            _ => format!("err ambient: DEGC must be a number in -40..=125, got {a:?}"),
        },
        ("", None) => "err empty command".into(),
        _ => format!(
            "err unknown command {line:?} (on, off, cycle [OFF_MS], status, ambient [DEGC])"
        ),
    }
}
