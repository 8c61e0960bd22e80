//! Fault specs -> checked pokes into accelerator memory, restore, and pristine checks.
//!
//! Only regions marked `injectable` in the board file can be touched, whatever the
//! controller sends; everything else is a refusal with a reason. Memory is accessed as
//! aligned 32-bit words (read-modify-write); every poke is read back. After a trial's
//! transient faults are restored, the parameter pages that were poked plus one rotating
//! page are compared (CRC32) with the pristine parameters (plus permanent faults): a
//! difference means the board is suspect.

use std::collections::BTreeMap;

use proto::board::{BoardFile, RegionKind};
use proto::manifest::Manifest;
use proto::wire::{FaultKind, FaultSpec, FaultTarget, Persistence};

use crate::board::Board;
use crate::hw::devmem::MmioError;

const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("{0}")]
    Refused(String),
    #[error("region {region}: {source}")]
    Mmio {
        region: String,
        #[source]
        source: MmioError,
    },
    #[error(
        "poke at {region}+{offset:#x} did not stick: wrote {wrote:#010x}, read back {read:#010x}"
    )]
    Verify {
        region: String,
        offset: u64,
        wrote: u32,
        read: u32,
    },
}

/// One modified word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poke {
    pub region: String,
    /// Word offset inside the region (multiple of 4).
    pub offset: u64,
    pub original: u32,
    pub value: u32,
    pub permanent: bool,
    /// Re-applied after every input write (faults in the input buffer).
    pub input_buffer: bool,
}

/// Where the model's parameters sit and what they should contain.
pub struct ParamsImage {
    pub region: String,
    /// Offset of the blob inside the region (the model's slot).
    pub offset: u64,
    pub blob: std::sync::Arc<Vec<u8>>,
}

pub struct Injector {
    pub params: ParamsImage,
    input_region: String,
    /// Permanent faults currently applied: (region, word offset) -> value.
    permanent: BTreeMap<(String, u64), u32>,
    /// CRCs of pages outside the parameter blob, taken before they were first poked.
    snapshots: BTreeMap<(String, u64), u32>,
    rotating: u64,
}

fn mask_words(byte_off: u64, bits: &[u8]) -> BTreeMap<u64, u32> {
    let mut m: BTreeMap<u64, u32> = BTreeMap::new();
    for &b in bits {
        let byte = byte_off + u64::from(b / 8);
        let word = byte & !3;
        let bit = ((byte % 4) * 8) as u32 + u32::from(b % 8);
        *m.entry(word).or_default() |= 1 << bit;
    }
    m
}

impl Injector {
    pub fn new(file: &BoardFile, params: ParamsImage) -> Injector {
        Injector {
            params,
            input_region: file.accelerator.input_region.clone(),
            permanent: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            rotating: 0,
        }
    }

    /// (region, byte offset in region, element bits) of a fault, or why it is refused.
    pub fn resolve(
        &self,
        file: &BoardFile,
        manifest: &Manifest,
        f: &FaultSpec,
    ) -> Result<(String, u64, u32), String> {
        let (region, off, bits) = match &f.target {
            FaultTarget::Tensor { name, element } => {
                let t = manifest
                    .tensor(name)
                    .ok_or_else(|| format!("unknown tensor {name:?} in model {}", manifest.name))?;
                let n = t.elements() as u64;
                if *element >= n {
                    return Err(format!(
                        "element {element} is outside tensor {name:?} ({n} elements)"
                    ));
                }
                let size = t.dtype.size() as u64;
                (
                    self.params.region.clone(),
                    self.params.offset + t.offset as u64 + element * size,
                    t.dtype.bits(),
                )
            }
            FaultTarget::Region { name, offset } => {
                let r = file
                    .region(name)
                    .ok_or_else(|| format!("unknown region {name:?}"))?;
                if offset.checked_add(4).is_none_or(|e| e > r.size) {
                    return Err(format!(
                        "offset {offset:#x} is outside region {name:?} (size {:#x})",
                        r.size
                    ));
                }
                (name.clone(), *offset, 32)
            }
        };
        let r = file
            .region(&region)
            .ok_or_else(|| format!("unknown region {region:?}"))?;
        if !r.injectable {
            return Err(format!("region {region:?} is not injectable"));
        }
        if f.bits.is_empty() {
            return Err("fault has no bits".into());
        }
        if let Some(b) = f.bits.iter().find(|&&b| u32::from(b) >= bits) {
            return Err(format!("bit {b} is outside the {bits}-bit element"));
        }
        if off
            .checked_add(u64::from(bits / 8))
            .is_none_or(|e| e > r.size)
        {
            return Err(format!("element at {off:#x} runs past region {region:?}"));
        }
        Ok((region, off, bits))
    }

    /// Check every fault first (all or nothing), then poke and read back.
    pub fn apply(
        &mut self,
        board: &Board,
        manifest: &Manifest,
        faults: &[FaultSpec],
    ) -> Result<Vec<Poke>, InjectError> {
        let mut planned = Vec::new();
        for f in faults {
            let (region, off, _) = self
                .resolve(&board.file, manifest, f)
                .map_err(InjectError::Refused)?;
            planned.push((region, off, f));
        }
        let mut pokes = Vec::new();
        for (region, off, f) in planned {
            let w = board
                .window(&region)
                .ok_or_else(|| InjectError::Refused(format!("region {region:?} is not mapped")))?;
            let is_params = region == self.params.region;
            for (word, mask) in mask_words(off, &f.bits) {
                if !is_params || !self.in_blob(word) {
                    let page = word & !(PAGE - 1);
                    if let std::collections::btree_map::Entry::Vacant(e) =
                        self.snapshots.entry((region.clone(), page))
                    {
                        let crc = w.crc32(page, PAGE).map_err(|source| InjectError::Mmio {
                            region: region.clone(),
                            source,
                        })?;
                        e.insert(crc);
                    }
                }
                let mmio = |source| InjectError::Mmio {
                    region: region.clone(),
                    source,
                };
                let original = w.read32(word).map_err(mmio)?;
                let value = match f.kind {
                    FaultKind::BitFlip => original ^ mask,
                    FaultKind::StuckAt0 => original & !mask,
                    FaultKind::StuckAt1 => original | mask,
                };
                w.write32(word, value).map_err(mmio)?;
                let read = w.read32(word).map_err(mmio)?;
                if read != value {
                    return Err(InjectError::Verify {
                        region,
                        offset: word,
                        wrote: value,
                        read,
                    });
                }
                let permanent = f.persistence == Persistence::Permanent;
                if permanent {
                    self.permanent.insert((region.clone(), word), value);
                }
                pokes.push(Poke {
                    region: region.clone(),
                    offset: word,
                    original,
                    value,
                    permanent,
                    input_buffer: region == self.input_region,
                });
            }
        }
        Ok(pokes)
    }

    fn in_blob(&self, off: u64) -> bool {
        off >= self.params.offset && off < self.params.offset + self.params.blob.len() as u64
    }

    /// Re-apply faults in the input buffer after an input was written over them.
    pub fn reapply_input(&self, board: &Board, pokes: &[Poke]) -> Result<(), InjectError> {
        for p in pokes.iter().filter(|p| p.input_buffer) {
            let w = board.window(&p.region).expect("poked region is mapped");
            let mmio = |source| InjectError::Mmio {
                region: p.region.clone(),
                source,
            };
            let cur = w.read32(p.offset).map_err(mmio)?;
            // Same kind of change on the fresh data: flip/force the bits that differed.
            let mask = p.original ^ p.value;
            let forced_one = p.value & mask;
            let forced_zero = !p.value & mask;
            let v = if forced_one == mask && p.original & mask == 0 {
                cur | mask
            } else if forced_zero == mask && p.original & mask == mask {
                cur & !mask
            } else {
                cur ^ mask
            };
            w.write32(p.offset, v).map_err(mmio)?;
        }
        Ok(())
    }

    /// Undo transient pokes (in reverse order, so overlapping faults unwind correctly).
    pub fn restore(&self, board: &Board, pokes: &[Poke]) -> Result<(), InjectError> {
        for p in pokes
            .iter()
            .rev()
            .filter(|p| !p.permanent && !p.input_buffer)
        {
            let w = board.window(&p.region).expect("poked region is mapped");
            let expected = self
                .permanent
                .get(&(p.region.clone(), p.offset))
                .copied()
                .unwrap_or(p.original);
            w.write32(p.offset, expected)
                .map_err(|source| InjectError::Mmio {
                    region: p.region.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Expected CRC of a page of the parameter blob (pristine + permanent faults).
    fn expected_page_crc(&self, page: u64) -> u32 {
        let start = page.max(self.params.offset);
        let end = (page + PAGE).min(self.params.offset + self.params.blob.len() as u64);
        let mut bytes = vec![0u8; PAGE as usize];
        let n = (end - start) as usize;
        let src = (start - self.params.offset) as usize;
        let dst = (start - page) as usize;
        bytes[dst..dst + n].copy_from_slice(&self.params.blob[src..src + n]);
        for ((r, off), v) in self.permanent.range((self.params.region.clone(), page)..) {
            if *r != self.params.region || *off >= page + PAGE {
                break;
            }
            let i = (off - page) as usize;
            bytes[i..i + 4].copy_from_slice(&v.to_le_bytes());
        }
        crc32fast::hash(&bytes)
    }

    /// Parameter pages that must be compared after a trial: every poked page plus one
    /// rotating page of the blob. Returns a description of the first mismatch.
    pub fn verify(&mut self, board: &Board, pokes: &[Poke]) -> Result<Option<String>, InjectError> {
        let mut pages: Vec<(String, u64)> = pokes
            .iter()
            .filter(|p| !p.input_buffer)
            .map(|p| (p.region.clone(), p.offset & !(PAGE - 1)))
            .collect();
        let blob_pages = (self.params.blob.len() as u64).div_ceil(PAGE).max(1);
        let first = self.params.offset & !(PAGE - 1);
        pages.push((
            self.params.region.clone(),
            first + (self.rotating % blob_pages) * PAGE,
        ));
        self.rotating = self.rotating.wrapping_add(1);
        pages.sort();
        pages.dedup();
        for (region, page) in pages {
            let w = board.window(&region).expect("region is mapped");
            if page + PAGE > w.len() {
                continue;
            }
            let got = w.crc32(page, PAGE).map_err(|source| InjectError::Mmio {
                region: region.clone(),
                source,
            })?;
            let in_blob = region == self.params.region
                && page + PAGE > self.params.offset
                && page < self.params.offset + self.params.blob.len() as u64;
            let want = if in_blob {
                // A page straddling the blob's edge also holds bytes of the next slot;
                // only compare pages fully inside the blob or snapshotted.
                if page < self.params.offset
                    || page + PAGE > self.params.offset + self.params.blob.len() as u64
                {
                    match self.snapshots.get(&(region.clone(), page)) {
                        Some(c) => *c,
                        None => continue,
                    }
                } else {
                    self.expected_page_crc(page)
                }
            } else {
                match self.snapshots.get(&(region.clone(), page)) {
                    Some(c) => *c,
                    None => continue,
                }
            };
            if got != want {
                return Ok(Some(format!(
                    "region {region:?} page {page:#x} differs from its pristine copy after restore (crc {got:#010x}, want {want:#010x})"
                )));
            }
        }
        Ok(None)
    }

    /// Write the pristine parameters back (job end, or after a reboot) and forget
    /// permanent faults.
    pub fn rewrite_pristine(&mut self, board: &Board) -> Result<(), InjectError> {
        let w = board
            .window(&self.params.region)
            .ok_or_else(|| InjectError::Refused("params region not mapped".into()))?;
        write_blob(w, self.params.offset, &self.params.blob).map_err(|source| {
            InjectError::Mmio {
                region: self.params.region.clone(),
                source,
            }
        })?;
        self.permanent.clear();
        Ok(())
    }

    pub fn permanent_faults(&self) -> usize {
        self.permanent.len()
    }

    /// Only weights regions are checked against a pristine copy.
    pub fn checks_region(file: &BoardFile, region: &str) -> bool {
        file.region(region)
            .is_some_and(|r| r.kind == RegionKind::Weights)
    }
}

/// Write a byte blob at `offset` (padded with zeros to a word).
pub fn write_blob(
    w: &crate::hw::devmem::MmioWindow,
    offset: u64,
    blob: &[u8],
) -> Result<(), MmioError> {
    let whole = blob.len() / 4 * 4;
    w.write_bytes(offset, &blob[..whole])?;
    if whole < blob.len() {
        let mut tail = [0u8; 4];
        tail[..blob.len() - whole].copy_from_slice(&blob[whole..]);
        w.write_bytes(offset + whole as u64, &tail)?;
    }
    Ok(())
}

/// CRC32 of `len` bytes at `offset` as they are in memory (padded to a word with the
/// memory's own bytes), compared against the blob padded with zeros.
pub fn blob_matches(
    w: &crate::hw::devmem::MmioWindow,
    offset: u64,
    blob: &[u8],
) -> Result<bool, MmioError> {
    let whole = blob.len() / 4 * 4;
    if w.crc32(offset, whole as u64)? != crc32fast::hash(&blob[..whole]) {
        return Ok(false);
    }
    if whole < blob.len() {
        let v = w.read32(offset + whole as u64)?.to_le_bytes();
        return Ok(v[..blob.len() - whole] == blob[whole..]);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_masks_span_words() {
        let m = mask_words(0x102, &[0, 15, 16]);
        // byte 0x102 bit0 -> word 0x100 bit 16; bit 15 -> byte 0x103 bit 7 -> word bit 31;
        // bit 16 -> byte 0x104 -> next word bit 0.
        assert_eq!(m.get(&0x100), Some(&((1 << 16) | (1 << 31))));
        assert_eq!(m.get(&0x104), Some(&1));
    }
}
