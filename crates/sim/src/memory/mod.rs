//! The file standing in for `/dev/mem`: file offset = physical address - `file_base`.
//!
//! The agent maps this file `MAP_SHARED` with exactly its `/dev/mem` code; the emulator
//! maps it `MAP_SHARED` too, so both see every store at once (same page cache pages).
//! The file is sparse: only touched pages take space, and a power-off punches the
//! whole range back to zeros.
//!
//! Another process writes the mapping concurrently, so nothing here hands out `&[u8]`
//! into it: bytes are copied in and out with volatile/atomic accesses.

use std::fs::{File, OpenOptions};
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::fcntl::{FallocateFlags, fallocate};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("memory file {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("memory file {path}: mmap of {len} bytes failed: {errno}")]
    Map {
        path: PathBuf,
        len: usize,
        errno: nix::Error,
    },
    #[error("memory file {path}: span is empty or too large ({len} bytes)")]
    BadSpan { path: PathBuf, len: u64 },
    #[error("physical range {addr:#x}+{len:#x} is outside the memory file ({base:#x}..{end:#x})")]
    OutOfRange {
        addr: u64,
        len: u64,
        base: u64,
        end: u64,
    },
    #[error("physical address {0:#x} is not 4-byte aligned")]
    Unaligned(u64),
}

pub struct MemFile {
    path: PathBuf,
    file: File,
    ptr: NonNull<u8>,
    len: usize,
    base: u64,
}

// SAFETY: the mapping is process-global memory shared with other processes anyway;
// every access goes through raw-pointer volatile copies or atomics, never references.
unsafe impl Send for MemFile {}
// SAFETY: as above; concurrent access is by design (it is a bus, not a Rust object).
unsafe impl Sync for MemFile {}

impl MemFile {
    /// Create (or truncate to zeros) the file covering `[base, base + len)` and map it.
    pub fn create(path: &Path, base: u64, len: u64) -> Result<MemFile, MemError> {
        let io = |what| {
            move |source| MemError::Io {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        let ulen = usize::try_from(len)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| MemError::BadSpan {
                path: path.to_path_buf(),
                len,
            })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io("create"))?;
        file.set_len(len).map_err(io("set size"))?;
        Self::map_shared(path, file, ulen, base)
    }

    /// Map all `len` bytes of `file` shared and read/write.
    fn map_shared(
        path: &Path,
        file: File,
        len: NonZeroUsize,
        base: u64,
    ) -> Result<MemFile, MemError> {
        // SAFETY: a shared read/write mapping of `len` bytes of a file at least that
        // long; the pointer is only used through the methods below, which bounds-check
        // every access against `len`. (If another process shrank the file, accesses past
        // its end would fault; the emulator never shrinks it.)
        let p = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                file.as_fd(),
                0,
            )
        }
        .map_err(|errno| MemError::Map {
            path: path.to_path_buf(),
            len: len.get(),
            errno,
        })?;
        Ok(MemFile {
            path: path.to_path_buf(),
            file,
            ptr: p.cast(),
            len: len.get(),
            base,
        })
    }

    /// Map an existing memory file (another process's board) without changing it: what
    /// the agent does with /dev/mem, minus the page-alignment bookkeeping.
    pub fn open(path: &Path, base: u64) -> Result<MemFile, MemError> {
        let io = |what| {
            move |source| MemError::Io {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io("open"))?;
        let len = file.metadata().map_err(io("stat"))?.len();
        let ulen = usize::try_from(len)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| MemError::BadSpan {
                path: path.to_path_buf(),
                len,
            })?;
        // The owner never shrinks the file, so the whole length stays mapped.
        Self::map_shared(path, file, ulen, base)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn base(&self) -> u64 {
        self.base
    }
    pub fn end(&self) -> u64 {
        self.base + self.len as u64
    }

    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.base && addr.checked_add(len).is_some_and(|e| e <= self.end())
    }

    fn offset(&self, addr: u64, len: u64) -> Result<usize, MemError> {
        if !self.contains(addr, len) {
            return Err(MemError::OutOfRange {
                addr,
                len,
                base: self.base,
                end: self.end(),
            });
        }
        Ok((addr - self.base) as usize)
    }

    /// Copy `buf.len()` bytes at physical `addr` out of the mapping.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let off = self.offset(addr, buf.len() as u64)?;
        // SAFETY: `off + buf.len() <= self.len` (checked above); the source is plain bytes
        // another process may be writing, which at worst yields a torn read of bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    pub fn read_vec(&self, addr: u64, len: usize) -> Result<Vec<u8>, MemError> {
        let mut v = vec![0u8; len];
        self.read(addr, &mut v)?;
        Ok(v)
    }

    /// Copy `data` into the mapping at physical `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        let off = self.offset(addr, data.len() as u64)?;
        // SAFETY: bounds checked above; the destination is shared plain bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(off), data.len())
        };
        Ok(())
    }

    /// The 32-bit word at `addr` as an atomic, for registers both sides update.
    fn word(&self, addr: u64) -> Result<&AtomicU32, MemError> {
        if !addr.is_multiple_of(4) {
            return Err(MemError::Unaligned(addr));
        }
        let off = self.offset(addr, 4)?;
        // SAFETY: in bounds, 4-byte aligned (the mapping is page-aligned and `base` is
        // page-aligned by board-file validation, so `off % 4 == addr % 4 == 0`), and an
        // AtomicU32 has the layout of u32. The reference lives as long as `self`, which
        // owns the mapping.
        Ok(unsafe { &*(self.ptr.as_ptr().add(off) as *const AtomicU32) })
    }

    pub fn load32(&self, addr: u64) -> Result<u32, MemError> {
        Ok(self.word(addr)?.load(Ordering::Acquire))
    }

    pub fn store32(&self, addr: u64, v: u32) -> Result<(), MemError> {
        self.word(addr)?.store(v, Ordering::Release);
        Ok(())
    }

    /// Atomically replace the word with `f(old)`; returns the old value. Used for the
    /// control register, which the agent may write between our read and our write.
    pub fn update32(&self, addr: u64, f: impl Fn(u32) -> u32) -> Result<u32, MemError> {
        let w = self.word(addr)?;
        let mut old = w.load(Ordering::Acquire);
        loop {
            match w.compare_exchange_weak(old, f(old), Ordering::AcqRel, Ordering::Acquire) {
                Ok(v) => return Ok(v),
                Err(v) => old = v,
            }
        }
    }

    /// Zero `[addr, addr + len)`: punch a hole (frees the pages; reads give zeros), or
    /// write zeros where the filesystem cannot punch.
    pub fn zero(&self, addr: u64, len: u64) -> Result<(), MemError> {
        let off = self.offset(addr, len)?;
        let punched = fallocate(
            self.file.as_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off as i64,
            len as i64,
        );
        if punched.is_err() {
            let chunk = vec![0u8; 1 << 20];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(chunk.len() as u64) as usize;
                self.write(addr + done, &chunk[..n])?;
                done += n as u64;
            }
        }
        Ok(())
    }

    /// Volatile state lost at power-off: everything.
    pub fn wipe(&self) -> Result<(), MemError> {
        self.zero(self.base, self.len as u64)
    }
}

impl Drop for MemFile {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; nothing borrows the mapping
        // past `self` (the atomics handed out are tied to `&self`).
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_bounds_and_wipe() {
        let d = tempfile::tempdir().unwrap();
        let m = MemFile::create(&d.path().join("mem"), 0x6000_0000, 0x10000).unwrap();
        m.write(0x6000_1000, &[1, 2, 3]).unwrap();
        assert_eq!(m.read_vec(0x6000_1000, 3).unwrap(), vec![1, 2, 3]);
        assert!(matches!(
            m.read_vec(0x5FFF_FFFF, 2),
            Err(MemError::OutOfRange { .. })
        ));
        assert!(matches!(
            m.write(0x6000_FFFF, &[0, 0]),
            Err(MemError::OutOfRange { .. })
        ));
        assert!(m.read_vec(u64::MAX - 1, 4).is_err());
        assert!(matches!(m.load32(0x6000_0002), Err(MemError::Unaligned(_))));
        m.store32(0x6000_0010, 0xDEAD_BEEF).unwrap();
        assert_eq!(m.update32(0x6000_0010, |v| v | 1).unwrap(), 0xDEAD_BEEF);
        assert_eq!(m.load32(0x6000_0010).unwrap(), 0xDEAD_BEEF | 1);
        m.wipe().unwrap();
        assert_eq!(m.read_vec(0x6000_1000, 3).unwrap(), vec![0, 0, 0]);
        assert_eq!(m.load32(0x6000_0010).unwrap(), 0);
        // Another mapping of the same file sees our stores (what the agent relies on).
        let f = std::fs::read(d.path().join("mem")).unwrap();
        assert_eq!(f.len(), 0x10000);
        m.write(0x6000_0100, &[7]).unwrap();
        let f = std::fs::read(d.path().join("mem")).unwrap();
        assert_eq!(f[0x100], 7);
    }
}
