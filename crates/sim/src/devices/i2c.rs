//! The I2C bus endpoint: a Unix stream socket carrying `proto::smbus` frames.
//!
//! It listens only while the board is up. When the board is off, locked or crashed
//! the listener is closed (the socket file stays, so connecting gives ECONNREFUSED,
//! the way nothing answers on a dead board) and open connections are shut.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use proto::smbus::{Request, Response, SmbusError, Status};

use crate::board::{Life, Shared, lock};

pub fn run(sh: Arc<Shared>, path: PathBuf) {
    while !sh.stopping() {
        // Wait for the board to come up, then take the listener `finish_boot` bound.
        let (listener, epoch) = {
            let mut l = lock(&sh.life);
            loop {
                if sh.stopping() {
                    return;
                }
                if l.life == Life::Up {
                    let epoch = sh.epoch.load(Ordering::Acquire);
                    let mut ls = lock(&sh.i2c_listeners);
                    if let Some((e, li)) = ls.remove(&path)
                        && e == epoch
                    {
                        break (li, epoch);
                    }
                }
                l = sh
                    .life_cv
                    .wait_timeout(l, Duration::from_millis(200))
                    .map(|r| r.0)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
        };
        tracing::debug!(path = %path.display(), "I2C bus listening");
        while !sh.stopping() && sh.epoch.load(Ordering::Acquire) == epoch {
            match listener.accept() {
                Ok((stream, _)) => {
                    let sh = sh.clone();
                    let bus = path.clone();
                    std::thread::spawn(move || serve(sh, bus, stream, epoch));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Wake on any life change, or poll accept every 100 ms.
                    let l = lock(&sh.life);
                    if sh.epoch.load(Ordering::Acquire) == epoch {
                        let _ = sh.life_cv.wait_timeout(l, Duration::from_millis(100));
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        // Dropping the listener leaves the socket file: connects are refused now.
        drop(listener);
    }
}

fn serve(sh: Arc<Shared>, bus: PathBuf, mut s: UnixStream, epoch: u64) {
    if s.set_read_timeout(Some(Duration::from_millis(200)))
        .is_err()
    {
        return;
    }
    let alive = |sh: &Shared| sh.epoch.load(Ordering::Acquire) == epoch && !sh.stopping();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        if !alive(&sh) {
            let _ = s.shutdown(std::net::Shutdown::Both);
            return;
        }
        // Read until one whole request is buffered (timeouts let us notice a dead board).
        let decoded = match Request::decode(&pending) {
            Ok(Some((req, pec, used))) => {
                pending.drain(..used);
                Some((req, pec))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(error = %e, "malformed SMBus frame; closing the connection");
                let _ = s.write_all(&[Status::Malformed as u8, 0]);
                let _ = s.shutdown(std::net::Shutdown::Both);
                return;
            }
        };
        let Some((req, pec)) = decoded else {
            match std::io::Read::read(&mut s, &mut buf) {
                Ok(0) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
            continue;
        };
        if !alive(&sh) {
            let _ = s.shutdown(std::net::Shutdown::Both);
            return;
        }
        let resp = transact(&sh, &bus, &req, pec);
        if s.write_all(&resp.encode(&req)).is_err() {
            return;
        }
    }
}

fn transact(sh: &Shared, bus: &PathBuf, req: &Request, pec: Option<u8>) -> Response {
    let Some(b) = sh.buses.get(bus) else {
        return Response::err(Status::AddrNack);
    };
    let view = *lock(&sh.sensors);
    let resp = lock(b).transact(req, pec, Instant::now(), &view);
    if !req.op.is_read() && resp.status == Status::Ok {
        sh.check_rails();
    }
    resp
}

/// Client-side helper for tests and tools: one transaction on a fresh or kept stream.
pub fn transact_on(stream: &mut UnixStream, req: &Request) -> Result<Response, SmbusError> {
    proto::smbus::transact(stream, req)
}
