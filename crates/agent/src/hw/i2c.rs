//! SMBus access to the regulators. Two transports, chosen by the board file's
//! `rails[].bus`: `/dev/i2c-N` through i2c-dev ioctls (a real board), or the emulator's
//! Unix socket carrying the same transactions framed by `proto::smbus`.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::devmem::i2c_ioctl;

#[derive(Debug, thiserror::Error)]
pub enum I2cError {
    #[error("{bus}: cannot open: {source}")]
    Open {
        bus: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{bus}: device {addr:#04x} register {reg:#04x}: {op} failed: {errno}")]
    Transfer {
        bus: String,
        addr: u8,
        reg: u8,
        op: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("{bus}: device {addr:#04x} register {reg:#04x}: {op}: {message}")]
    Device {
        bus: String,
        addr: u8,
        reg: u8,
        op: &'static str,
        message: String,
    },
    #[error("{bus}: bus unreachable: {message}")]
    Unreachable { bus: String, message: String },
}

impl I2cError {
    /// The bus itself is gone (emulator socket closed, adapter removed): on the emulator
    /// this is what a crashed board looks like.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, I2cError::Unreachable { .. } | I2cError::Open { .. })
    }
}

/// The SMBus transactions the regulator drivers need. `pec` adds packet error checking
/// (PMBus devices that require it).
pub trait I2cBus: Send {
    fn name(&self) -> &str;
    fn read_byte_data(&mut self, addr: u8, reg: u8, pec: bool) -> Result<u8, I2cError>;
    fn write_byte_data(&mut self, addr: u8, reg: u8, value: u8, pec: bool) -> Result<(), I2cError>;
    fn read_word_data(&mut self, addr: u8, reg: u8, pec: bool) -> Result<u16, I2cError>;
    fn write_word_data(&mut self, addr: u8, reg: u8, value: u16, pec: bool)
    -> Result<(), I2cError>;
}

/// `/dev/i2c-N` via i2c-dev.
#[derive(Debug)]
pub struct DevBus {
    name: String,
    fd: OwnedFd,
    addr: Option<u8>,
    pec: Option<bool>,
}

impl DevBus {
    pub fn open(path: &Path) -> Result<DevBus, I2cError> {
        let name = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| I2cError::Open {
                bus: name.clone(),
                source,
            })?;
        Ok(DevBus {
            name,
            fd: file.into(),
            addr: None,
            pec: None,
        })
    }

    fn select(&mut self, addr: u8, reg: u8, pec: bool) -> Result<(), I2cError> {
        if self.addr != Some(addr) {
            i2c_ioctl::set_slave_force(self.fd.as_fd(), addr).map_err(|errno| {
                I2cError::Transfer {
                    bus: self.name.clone(),
                    addr,
                    reg,
                    op: "I2C_SLAVE_FORCE",
                    errno,
                }
            })?;
            self.addr = Some(addr);
        }
        if self.pec != Some(pec) {
            i2c_ioctl::set_pec(self.fd.as_fd(), pec).map_err(|errno| I2cError::Transfer {
                bus: self.name.clone(),
                addr,
                reg,
                op: "I2C_PEC",
                errno,
            })?;
            self.pec = Some(pec);
        }
        Ok(())
    }

    /// `kind` = (read/write, transaction size, name for errors).
    fn xfer(
        &mut self,
        addr: u8,
        reg: u8,
        pec: bool,
        kind: (u8, u32, &'static str),
        data: &mut [u8; 34],
    ) -> Result<(), I2cError> {
        let (rw, size, op) = kind;
        self.select(addr, reg, pec)?;
        i2c_ioctl::smbus(self.fd.as_fd(), rw, reg, size, data).map_err(|errno| I2cError::Transfer {
            bus: self.name.clone(),
            addr,
            reg,
            op,
            errno,
        })
    }
}

impl I2cBus for DevBus {
    fn name(&self) -> &str {
        &self.name
    }
    fn read_byte_data(&mut self, addr: u8, reg: u8, pec: bool) -> Result<u8, I2cError> {
        let mut d = [0u8; 34];
        self.xfer(
            addr,
            reg,
            pec,
            (
                i2c_ioctl::I2C_SMBUS_READ,
                i2c_ioctl::I2C_SMBUS_BYTE_DATA,
                "read byte",
            ),
            &mut d,
        )?;
        Ok(d[0])
    }
    fn write_byte_data(&mut self, addr: u8, reg: u8, value: u8, pec: bool) -> Result<(), I2cError> {
        let mut d = [0u8; 34];
        d[0] = value;
        self.xfer(
            addr,
            reg,
            pec,
            (
                i2c_ioctl::I2C_SMBUS_WRITE,
                i2c_ioctl::I2C_SMBUS_BYTE_DATA,
                "write byte",
            ),
            &mut d,
        )
    }
    fn read_word_data(&mut self, addr: u8, reg: u8, pec: bool) -> Result<u16, I2cError> {
        let mut d = [0u8; 34];
        self.xfer(
            addr,
            reg,
            pec,
            (
                i2c_ioctl::I2C_SMBUS_READ,
                i2c_ioctl::I2C_SMBUS_WORD_DATA,
                "read word",
            ),
            &mut d,
        )?;
        // The kernel stores the word in host order in the union.
        Ok(u16::from_ne_bytes([d[0], d[1]]))
    }
    fn write_word_data(
        &mut self,
        addr: u8,
        reg: u8,
        value: u16,
        pec: bool,
    ) -> Result<(), I2cError> {
        let mut d = [0u8; 34];
        d[..2].copy_from_slice(&value.to_ne_bytes());
        self.xfer(
            addr,
            reg,
            pec,
            (
                i2c_ioctl::I2C_SMBUS_WRITE,
                i2c_ioctl::I2C_SMBUS_WORD_DATA,
                "write word",
            ),
            &mut d,
        )
    }
}

/// Open the bus a rail names: `dev: /dev/i2c-1` or `socket: i2c.sock` (relative paths
/// against `root`).
pub fn open_bus(bus: &proto::board::I2cBus, root: &Path) -> Result<Box<dyn I2cBus>, I2cError> {
    match bus {
        proto::board::I2cBus::Dev(p) => {
            Ok(Box::new(DevBus::open(&proto::board::resolve(root, p))?))
        }
        proto::board::I2cBus::Socket(p) => Ok(Box::new(super::smbus_socket::SocketBus::new(
            proto::board::resolve(root, p),
        ))),
    }
}

/// Key identifying a bus so rails on the same bus share one handle.
pub fn bus_key(bus: &proto::board::I2cBus, root: &Path) -> PathBuf {
    match bus {
        proto::board::I2cBus::Dev(p) | proto::board::I2cBus::Socket(p) => {
            proto::board::resolve(root, p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_adapter_is_a_named_error() {
        let e = DevBus::open(Path::new("/dev/i2c-does-not-exist")).unwrap_err();
        assert!(e.to_string().contains("/dev/i2c-does-not-exist"), "{e}");
        assert!(e.is_unreachable());
    }

    #[test]
    fn ioctl_on_a_non_i2c_file_fails_cleanly() {
        // A regular file rejects the i2c-dev ioctls with ENOTTY: proves the real code
        // path runs and reports errno instead of panicking.
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = DevBus::open(f.path()).unwrap();
        let e = b.read_byte_data(0x33, 0x25, false).unwrap_err();
        assert!(
            e.to_string().contains("0x33") && e.to_string().contains("I2C_SLAVE_FORCE"),
            "{e}"
        );
    }
}
