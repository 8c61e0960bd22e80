//! The emulator's I2C bus: SMBus transactions over a Unix stream socket, framed by
//! `proto::smbus`. Connects lazily and reconnects after any transport error, so a
//! power-cycled board is picked up again; a refused or closed connection is reported as
//! [`I2cError::Unreachable`] (what a crashed board looks like).

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use proto::smbus::{self, Request, SmbusError, Status};

use super::i2c::{I2cBus, I2cError};

pub struct SocketBus {
    path: PathBuf,
    name: String,
    stream: Option<UnixStream>,
    timeout: Duration,
}

impl SocketBus {
    pub fn new(path: PathBuf) -> SocketBus {
        SocketBus {
            name: path.display().to_string(),
            path,
            stream: None,
            timeout: Duration::from_secs(2),
        }
    }

    fn op_name(req: &Request) -> &'static str {
        match req.op {
            smbus::Op::ReadByteData => "read byte",
            smbus::Op::WriteByteData => "write byte",
            smbus::Op::ReadWordData => "read word",
            smbus::Op::WriteWordData => "write word",
            _ => "transfer",
        }
    }

    fn transact(&mut self, req: Request) -> Result<Vec<u8>, I2cError> {
        if self.stream.is_none() {
            let s = UnixStream::connect(&self.path).map_err(|e| I2cError::Unreachable {
                bus: self.name.clone(),
                message: format!("connect: {e}"),
            })?;
            // A board that stops answering must not block the agent forever.
            let _ = s.set_read_timeout(Some(self.timeout));
            let _ = s.set_write_timeout(Some(self.timeout));
            self.stream = Some(s);
        }
        let stream = self.stream.as_mut().expect("connected above");
        let resp = match smbus::transact(stream, &req) {
            Ok(r) => r,
            Err(e) => {
                self.stream = None;
                return Err(match e {
                    SmbusError::Io(_) | SmbusError::Closed => I2cError::Unreachable {
                        bus: self.name.clone(),
                        message: e.to_string(),
                    },
                    other => I2cError::Device {
                        bus: self.name.clone(),
                        addr: req.addr,
                        reg: req.cmd,
                        op: Self::op_name(&req),
                        message: other.to_string(),
                    },
                });
            }
        };
        if resp.status != Status::Ok {
            if resp.status == Status::Malformed {
                self.stream = None;
            }
            return Err(I2cError::Transfer {
                bus: self.name.clone(),
                addr: req.addr,
                reg: req.cmd,
                op: Self::op_name(&req),
                errno: nix::errno::Errno::from_raw(resp.status.errno()),
            });
        }
        Ok(resp.data)
    }
}

fn with_pec(r: Request, pec: bool) -> Request {
    if pec { r.with_pec() } else { r }
}

impl I2cBus for SocketBus {
    fn name(&self) -> &str {
        &self.name
    }
    fn read_byte_data(&mut self, addr: u8, reg: u8, pec: bool) -> Result<u8, I2cError> {
        let d = self.transact(with_pec(Request::read_byte_data(addr, reg), pec))?;
        Ok(d[0])
    }
    fn write_byte_data(&mut self, addr: u8, reg: u8, value: u8, pec: bool) -> Result<(), I2cError> {
        self.transact(with_pec(Request::write_byte_data(addr, reg, value), pec))
            .map(drop)
    }
    fn read_word_data(&mut self, addr: u8, reg: u8, pec: bool) -> Result<u16, I2cError> {
        let d = self.transact(with_pec(Request::read_word_data(addr, reg), pec))?;
        Ok(u16::from_le_bytes([d[0], d[1]]))
    }
    fn write_word_data(
        &mut self,
        addr: u8,
        reg: u8,
        value: u16,
        pec: bool,
    ) -> Result<(), I2cError> {
        self.transact(with_pec(Request::write_word_data(addr, reg, value), pec))
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_socket_is_unreachable() {
        let d = tempfile::tempdir().unwrap();
        let mut b = SocketBus::new(d.path().join("i2c-1.sock"));
        let e = b.read_byte_data(0x32, 0x25, false).unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        assert!(e.to_string().contains("i2c-1.sock"), "{e}");
    }
}
