//! Physical memory windows (`/dev/mem`, or the emulator's memory file) and the two
//! i2c-dev ioctls. This is the agent's only module with `unsafe`: every syscall that
//! hands the kernel a raw pointer lives here, behind safe, checked wrappers.
//!
//! A window is an owned mapping that is never exposed as a slice: all accesses are
//! volatile, 32-bit, 4-byte aligned and bounds-checked, because the PL answers AXI reads
//! as Device memory and faults on unaligned access (kv260.md section 3.2).

use std::ffi::c_void;
use std::fs::OpenOptions;
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map {len:#x} bytes at physical {phys:#x} from {path}: {errno}")]
    Map {
        path: PathBuf,
        phys: u64,
        len: u64,
        errno: nix::errno::Errno,
    },
    #[error("physical {phys:#x} is below the device's base {file_base:#x}")]
    BelowBase { phys: u64, file_base: u64 },
    #[error("physical {phys:#x} is not aligned to the {page}-byte page")]
    Unaligned { phys: u64, page: u64 },
    #[error("zero-length window")]
    Empty,
    #[error("access of {len} bytes at offset {offset:#x} is outside the {size:#x}-byte window")]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    #[error("offset {offset:#x} (length {len}) is not 4-byte aligned")]
    Misaligned { offset: u64, len: u64 },
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| u64::try_from(p).ok())
        .unwrap_or(4096)
}

/// One mapped, page-aligned window of physical memory.
#[derive(Debug)]
pub struct MmioWindow {
    ptr: NonNull<c_void>,
    len: usize,
    phys: u64,
    // Kept open for the mapping's lifetime (not required by mmap, but it documents
    // ownership and keeps /proc/<pid>/fd honest).
    _fd: OwnedFd,
}

// SAFETY: the window owns its mapping; all accesses go through volatile reads/writes of
// `u32` at checked offsets and never create references into the mapping, so sharing the
// pointer across threads cannot create aliasing `&mut`. Concurrent volatile accesses are
// what the hardware sees from any multi-threaded /dev/mem user.
unsafe impl Send for MmioWindow {}
// SAFETY: see `Send`: `&MmioWindow` only permits volatile word accesses.
unsafe impl Sync for MmioWindow {}

impl MmioWindow {
    /// Map `[phys, phys+len)` of `device`, whose offset 0 is physical `file_base`.
    pub fn open(device: &Path, file_base: u64, phys: u64, len: u64) -> Result<Self, MmioError> {
        let page = page_size();
        if len == 0 {
            return Err(MmioError::Empty);
        }
        if phys < file_base {
            return Err(MmioError::BelowBase { phys, file_base });
        }
        if !phys.is_multiple_of(page) {
            return Err(MmioError::Unaligned { phys, page });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_SYNC)
            .open(device)
            .map_err(|source| MmioError::Open {
                path: device.to_path_buf(),
                source,
            })?;
        let fd: OwnedFd = file.into();
        let map_err = |errno| MmioError::Map {
            path: device.to_path_buf(),
            phys,
            len,
            errno,
        };
        let offset = nix::libc::off_t::try_from(phys - file_base)
            .map_err(|_| map_err(nix::errno::Errno::EOVERFLOW))?;
        let ulen = usize::try_from(len).map_err(|_| map_err(nix::errno::Errno::EOVERFLOW))?;
        let length = NonZeroUsize::new(ulen).ok_or(MmioError::Empty)?;
        // SAFETY: we ask for a fresh shared mapping (addr = None, so nothing existing is
        // replaced) of a file we hold open, at a page-aligned offset checked above. The
        // returned pointer is only used through volatile accesses bounded by `len`.
        let ptr = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                offset,
            )
        }
        .map_err(map_err)?;
        Ok(MmioWindow {
            ptr,
            len: ulen,
            phys,
            _fd: fd,
        })
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn phys(&self) -> u64 {
        self.phys
    }

    fn check(&self, offset: u64, len: u64) -> Result<usize, MmioError> {
        if !offset.is_multiple_of(4) || !len.is_multiple_of(4) {
            return Err(MmioError::Misaligned { offset, len });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.len as u64 => Ok(offset as usize),
            _ => Err(MmioError::OutOfBounds {
                offset,
                len,
                size: self.len as u64,
            }),
        }
    }

    pub fn read32(&self, offset: u64) -> Result<u32, MmioError> {
        let off = self.check(offset, 4)?;
        // SAFETY: `off + 4 <= len` and `off % 4 == 0` (checked), the mapping is page
        // aligned so the address is 4-byte aligned, and it stays mapped while `self` lives.
        Ok(unsafe {
            self.ptr
                .as_ptr()
                .cast::<u8>()
                .add(off)
                .cast::<u32>()
                .read_volatile()
        })
    }

    pub fn write32(&self, offset: u64, value: u32) -> Result<(), MmioError> {
        let off = self.check(offset, 4)?;
        // SAFETY: as in `read32`; the mapping is PROT_WRITE and shared.
        unsafe {
            self.ptr
                .as_ptr()
                .cast::<u8>()
                .add(off)
                .cast::<u32>()
                .write_volatile(value)
        };
        Ok(())
    }

    /// Copy `buf.len()` bytes from `offset` (both multiples of 4), word by word.
    pub fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<(), MmioError> {
        let off = self.check(offset, buf.len() as u64)?;
        let base = self.ptr.as_ptr().cast::<u8>();
        for (i, chunk) in buf.chunks_exact_mut(4).enumerate() {
            // SAFETY: the whole range `off..off+buf.len()` was checked to be inside the
            // window and 4-byte aligned; `i*4 < buf.len()`.
            let w = unsafe { base.add(off + i * 4).cast::<u32>().read_volatile() };
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        Ok(())
    }

    /// Copy `buf` to `offset` (both multiples of 4), word by word.
    pub fn write_bytes(&self, offset: u64, buf: &[u8]) -> Result<(), MmioError> {
        let off = self.check(offset, buf.len() as u64)?;
        let base = self.ptr.as_ptr().cast::<u8>();
        for (i, chunk) in buf.chunks_exact(4).enumerate() {
            let w = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            // SAFETY: as in `read_bytes`.
            unsafe { base.add(off + i * 4).cast::<u32>().write_volatile(w) };
        }
        Ok(())
    }

    /// CRC32 of `[offset, offset+len)`, read with volatile word accesses.
    pub fn crc32(&self, offset: u64, len: u64) -> Result<u32, MmioError> {
        let off = self.check(offset, len)?;
        let base = self.ptr.as_ptr().cast::<u8>();
        let mut h = crc32fast::Hasher::new();
        for i in 0..(len as usize / 4) {
            // SAFETY: as in `read_bytes`.
            let w = unsafe { base.add(off + i * 4).cast::<u32>().read_volatile() };
            h.update(&w.to_le_bytes());
        }
        Ok(h.finalize())
    }
}

impl Drop for MmioWindow {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned and nothing else unmaps it;
        // no reference into the mapping can outlive `self` (accesses are by value).
        if let Err(e) = unsafe { munmap(self.ptr, self.len) } {
            tracing::error!(phys = self.phys, error = %e, "munmap failed");
        }
    }
}

/// i2c-dev ioctls (linux/i2c-dev.h, linux/i2c.h). Used by `hw::i2c::DevBus`.
pub mod i2c_ioctl {
    use std::os::fd::{AsRawFd, BorrowedFd};

    const I2C_SLAVE_FORCE: nix::libc::c_ulong = 0x0706;
    const I2C_PEC: nix::libc::c_ulong = 0x0708;
    const I2C_SMBUS: nix::libc::c_ulong = 0x0720;
    pub const I2C_SMBUS_READ: u8 = 1;
    pub const I2C_SMBUS_WRITE: u8 = 0;
    pub const I2C_SMBUS_BYTE_DATA: u32 = 2;
    pub const I2C_SMBUS_WORD_DATA: u32 = 3;

    #[repr(C)]
    struct SmbusIoctlData {
        read_write: u8,
        command: u8,
        size: u32,
        data: *mut [u8; 34],
    }

    /// Address `addr` even if a kernel driver has bound it: on the K26 the DA9130/DA9131
    /// are owned by da9121-regulator, which would otherwise make the address EBUSY.
    pub fn set_slave_force(fd: BorrowedFd<'_>, addr: u8) -> nix::Result<()> {
        // SAFETY: I2C_SLAVE_FORCE takes its argument by value (an int), no pointer is
        // passed; `fd` is a valid open descriptor for the borrow's lifetime.
        let r = unsafe {
            nix::libc::ioctl(
                fd.as_raw_fd(),
                I2C_SLAVE_FORCE as _,
                nix::libc::c_ulong::from(addr),
            )
        };
        nix::errno::Errno::result(r).map(drop)
    }

    /// Enable or disable SMBus packet error checking for following transfers.
    pub fn set_pec(fd: BorrowedFd<'_>, on: bool) -> nix::Result<()> {
        // SAFETY: I2C_PEC takes an integer by value; `fd` is valid.
        let r =
            unsafe { nix::libc::ioctl(fd.as_raw_fd(), I2C_PEC as _, nix::libc::c_ulong::from(on)) };
        nix::errno::Errno::result(r).map(drop)
    }

    /// One SMBus transfer; `data` is the kernel's `union i2c_smbus_data` (34 bytes).
    pub fn smbus(
        fd: BorrowedFd<'_>,
        read_write: u8,
        command: u8,
        size: u32,
        data: &mut [u8; 34],
    ) -> nix::Result<()> {
        let mut args = SmbusIoctlData {
            read_write,
            command,
            size,
            data: data as *mut [u8; 34],
        };
        // SAFETY: `args` is a properly laid out `struct i2c_smbus_ioctl_data` whose
        // `data` points to a live, exclusively borrowed 34-byte buffer (the size of the
        // kernel union), valid for the duration of the call; `fd` is valid.
        let r = unsafe {
            nix::libc::ioctl(
                fd.as_raw_fd(),
                I2C_SMBUS as _,
                &mut args as *mut SmbusIoctlData,
            )
        };
        nix::errno::Errno::result(r).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(len: usize) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len as u64).unwrap();
        f
    }

    #[test]
    fn volatile_words_reach_the_file() {
        let f = file(3 * 4096);
        let w = MmioWindow::open(f.path(), 0x8000_0000, 0x8000_1000, 0x2000).unwrap();
        w.write32(0x10, 0xdead_beef).unwrap();
        assert_eq!(w.read32(0x10).unwrap(), 0xdead_beef);
        drop(w);
        let bytes = std::fs::read(f.path()).unwrap();
        assert_eq!(&bytes[0x1010..0x1014], &0xdead_beefu32.to_le_bytes());
    }

    #[test]
    fn bulk_copy_and_crc() {
        let f = file(4096);
        let w = MmioWindow::open(f.path(), 0, 0, 4096).unwrap();
        let data: Vec<u8> = (0..64u8).collect();
        w.write_bytes(64, &data).unwrap();
        let mut back = vec![0u8; 64];
        w.read_bytes(64, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(w.crc32(64, 64).unwrap(), crc32fast::hash(&data));
    }

    #[test]
    fn bounds_and_alignment_are_checked() {
        let f = file(4096);
        let w = MmioWindow::open(f.path(), 0, 0, 4096).unwrap();
        assert!(matches!(w.read32(4096), Err(MmioError::OutOfBounds { .. })));
        assert!(matches!(w.read32(4094), Err(MmioError::Misaligned { .. })));
        assert!(matches!(w.write32(2, 0), Err(MmioError::Misaligned { .. })));
        assert!(matches!(
            w.read32(u64::MAX - 3),
            Err(MmioError::OutOfBounds { .. })
        ));
        let mut b = [0u8; 8];
        assert!(matches!(
            w.read_bytes(4092, &mut b),
            Err(MmioError::OutOfBounds { .. })
        ));
        assert!(matches!(
            MmioWindow::open(f.path(), 0, 100, 4096),
            Err(MmioError::Unaligned { .. })
        ));
        assert!(matches!(
            MmioWindow::open(f.path(), 4096, 0, 4096),
            Err(MmioError::BelowBase { .. })
        ));
        let e = MmioWindow::open(Path::new("/nonexistent/mem"), 0, 0, 4096).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/mem"), "{e}");
    }
}
