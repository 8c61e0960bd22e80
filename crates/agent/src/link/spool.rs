//! The durable record spool: every record is on disk before it is sent, and is deleted
//! only after the controller acks its seq (having committed it).
//!
//! Layout of the spool directory:
//! - `seg-<first seq, 20 digits>.spool`: append-only segments of frames
//!   `[u32 LE payload length][u32 LE crc32(payload)][payload]`, payload = postcard
//!   [`Batch`]. One batch = the records of one or more finished trials plus the job
//!   progress after them, so records and progress are committed atomically (one write,
//!   one fsync). A torn tail (crash mid-write) fails its length or CRC check and is cut
//!   off on open: the trial is then simply not done.
//! - `meta.json`: `acked_upto`, `next_seq` and the last progress, rewritten atomically
//!   (tmp + fsync + rename) before acked segments are deleted, so neither the seq counter
//!   nor the job progress can go backwards when their records disappear.
//!
//! Bounded: once `max_bytes` of unacked data is held, [`Spool::is_full`] tells the
//! trial loop to wait (records are never dropped).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use proto::wire::Record;
use serde::{Deserialize, Serialize};

const SEGMENT_BYTES: u64 = 1 << 20;
const FRAME_HEADER: u64 = 8;
/// A single batch larger than this is refused (and never read back).
const MAX_BATCH_BYTES: u32 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spool {path}: {message}")]
    Corrupt { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where a job stands once this batch is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub job_id: u64,
    /// Index (in execution order) of the next trial to run.
    pub next_trial: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub progress: Option<Progress>,
    pub records: Vec<Record>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Meta {
    acked_upto: u64,
    next_seq: u64,
    progress: Option<Progress>,
}

#[derive(Debug, Clone)]
struct BatchIdx {
    /// First and last seq (first > last for a batch without records).
    first: u64,
    last: u64,
    offset: u64,
    len: u32,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    bytes: u64,
    batches: Vec<BatchIdx>,
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    segments: Vec<Segment>,
    active: Option<File>,
    next_seq: u64,
    acked_upto: u64,
    progress: Option<Progress>,
    max_bytes: u64,
}

impl Spool {
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let meta_path = dir.join("meta.json");
        let meta: Meta = match std::fs::read(&meta_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| SpoolError::Corrupt {
                path: meta_path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Meta::default(),
            Err(e) => return Err(io(&meta_path)(e)),
        };
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("seg-") && n.ends_with(".spool"))
            })
            .collect();
        names.sort();
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            segments: Vec::new(),
            active: None,
            next_seq: meta.next_seq.max(meta.acked_upto + 1).max(1),
            acked_upto: meta.acked_upto,
            progress: meta.progress,
            max_bytes,
        };
        let n = names.len();
        for (i, path) in names.into_iter().enumerate() {
            let seg = spool.scan(&path, i + 1 == n)?;
            for b in &seg.batches {
                if b.first <= b.last {
                    spool.next_seq = spool.next_seq.max(b.last + 1);
                }
            }
            spool.segments.push(seg);
        }
        // Progress recorded in batches is newer than meta's.
        for seg in &spool.segments {
            for b in &seg.batches {
                let batch = read_batch(&seg.path, b)?;
                if let Some(p) = batch.progress {
                    spool.progress = Some(p);
                }
            }
        }
        Ok(spool)
    }

    /// Index a segment; a torn tail of the last one is truncated away.
    fn scan(&self, path: &Path, last: bool) -> Result<Segment, SpoolError> {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io(path))?;
        let mut data = Vec::new();
        f.read_to_end(&mut data).map_err(io(path))?;
        let mut off = 0usize;
        let mut batches = Vec::new();
        let mut torn = None;
        while off < data.len() {
            let bad = |m: &str| format!("frame at byte {off}: {m}");
            if data.len() - off < FRAME_HEADER as usize {
                torn = Some(bad("truncated header"));
                break;
            }
            let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap_or_default());
            let crc = u32::from_le_bytes(data[off + 4..off + 8].try_into().unwrap_or_default());
            let start = off + FRAME_HEADER as usize;
            if len > MAX_BATCH_BYTES || data.len() - start < len as usize {
                torn = Some(bad("truncated payload"));
                break;
            }
            let payload = &data[start..start + len as usize];
            if crc32fast::hash(payload) != crc {
                torn = Some(bad("checksum mismatch"));
                break;
            }
            let batch: Batch = postcard::from_bytes(payload).map_err(|e| SpoolError::Corrupt {
                path: path.to_path_buf(),
                message: bad(&e.to_string()),
            })?;
            let (first, last) = match (batch.records.first(), batch.records.last()) {
                (Some(a), Some(b)) => (a.seq, b.seq),
                _ => (1, 0),
            };
            batches.push(BatchIdx {
                first,
                last,
                offset: off as u64,
                len,
            });
            off = start + len as usize;
        }
        if let Some(why) = torn {
            if !last {
                return Err(SpoolError::Corrupt {
                    path: path.to_path_buf(),
                    message: why,
                });
            }
            tracing::warn!(path = %path.display(), at = off, reason = %why, "Cutting torn spool tail");
            f.set_len(off as u64).map_err(io(path))?;
            f.sync_all().map_err(io(path))?;
        }
        Ok(Segment {
            path: path.to_path_buf(),
            bytes: off as u64,
            batches,
        })
    }

    /// Highest seq ever assigned (0 if none).
    pub fn head(&self) -> u64 {
        self.next_seq - 1
    }

    pub fn acked_upto(&self) -> u64 {
        self.acked_upto
    }

    /// Job progress as of the last committed batch (or the last truncation).
    pub fn progress(&self) -> Option<Progress> {
        self.progress
    }

    pub fn unacked_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    pub fn is_full(&self) -> bool {
        self.unacked_bytes() >= self.max_bytes
    }

    /// Assign seqs to `records`, write them with `progress` as one frame and fsync.
    /// Returns the seq range (empty if no records).
    pub fn append(
        &mut self,
        progress: Option<Progress>,
        mut records: Vec<Record>,
    ) -> Result<std::ops::RangeInclusive<u64>, SpoolError> {
        let first = self.next_seq;
        for (i, r) in records.iter_mut().enumerate() {
            r.seq = first + i as u64;
        }
        let batch = Batch { progress, records };
        let payload = postcard::to_stdvec(&batch).map_err(|e| SpoolError::Corrupt {
            path: self.dir.clone(),
            message: format!("encoding a batch: {e}"),
        })?;
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= MAX_BATCH_BYTES)
            .ok_or_else(|| SpoolError::Corrupt {
                path: self.dir.clone(),
                message: format!("batch of {} bytes exceeds {MAX_BATCH_BYTES}", payload.len()),
            })?;
        let need_new = match self.segments.last() {
            None => true,
            Some(s) => s.bytes >= SEGMENT_BYTES || self.active.is_none(),
        };
        if need_new {
            let path = self.dir.join(format!("seg-{first:020}.spool"));
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io(&path))?;
            let bytes = f.metadata().map_err(io(&path))?.len();
            sync_dir(&self.dir)?;
            if self.segments.last().is_none_or(|s| s.path != path) {
                self.segments.push(Segment {
                    path,
                    bytes,
                    batches: Vec::new(),
                });
            }
            self.active = Some(f);
        }
        let seg = self.segments.last_mut().expect("segment just ensured");
        let f = self.active.as_mut().expect("active segment just ensured");
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        let write = f.write_all(&frame).and_then(|_| f.sync_data());
        if let Err(e) = write {
            // Leave the file as it is: a partial frame is cut on the next open. Drop the
            // handle so the next append starts a fresh segment after it.
            self.active = None;
            return Err(io(&seg.path)(e));
        }
        let n = batch.records.len() as u64;
        let (bf, bl) = if n == 0 {
            (1, 0)
        } else {
            (first, first + n - 1)
        };
        seg.batches.push(BatchIdx {
            first: bf,
            last: bl,
            offset: seg.bytes,
            len,
        });
        seg.bytes += frame.len() as u64;
        self.next_seq += n;
        if progress.is_some() {
            self.progress = progress;
        }
        #[allow(clippy::reversed_empty_ranges)]
        Ok(first..=first + n - 1)
    }

    /// Up to `max` records with seq > `after`, in seq order (whole batches, so possibly
    /// a few more than `max`).
    pub fn read_after(&self, after: u64, max: usize) -> Result<Vec<Record>, SpoolError> {
        let mut out = Vec::new();
        for seg in &self.segments {
            for b in &seg.batches {
                if b.first > b.last || b.last <= after {
                    continue;
                }
                let batch = read_batch(&seg.path, b)?;
                out.extend(batch.records.into_iter().filter(|r| r.seq > after));
                if out.len() >= max {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// The controller committed everything up to `upto`: persist that, then delete
    /// segments that hold nothing newer. Seqs are never reused, even if the controller
    /// knows seqs this spool never had (state dir wiped).
    pub fn ack(&mut self, upto: u64) -> Result<(), SpoolError> {
        if upto <= self.acked_upto {
            return Ok(());
        }
        self.acked_upto = upto;
        self.next_seq = self.next_seq.max(upto + 1);
        // The segment being appended to stays until it is full: deleting and recreating
        // it on every ack would cost several fsyncs per batch.
        let last = self.segments.len().saturating_sub(1);
        let deletable: Vec<usize> = self
            .segments
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                (*i != last || s.bytes >= SEGMENT_BYTES)
                    && s.batches.iter().all(|b| b.first > b.last || b.last <= upto)
            })
            .map(|(i, _)| i)
            .collect();
        if deletable.is_empty() {
            // Nothing leaves the disk, so the seq counter and the progress stay derivable
            // from the segments; the ack itself is re-learned from the controller's
            // Welcome after a restart.
            return Ok(());
        }
        self.write_meta()?;
        for &i in deletable.iter().rev() {
            let s = self.segments.remove(i);
            if i == self.segments.len() {
                // It was the active segment.
                self.active = None;
            }
            std::fs::remove_file(&s.path).map_err(io(&s.path))?;
        }
        if !deletable.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    fn write_meta(&self) -> Result<(), SpoolError> {
        let meta = Meta {
            acked_upto: self.acked_upto,
            next_seq: self.next_seq,
            progress: self.progress,
        };
        let tmp = self.dir.join("meta.json.tmp");
        let path = self.dir.join("meta.json");
        let text = serde_json::to_vec(&meta).map_err(|e| SpoolError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&text)
            .and_then(|_| f.sync_all())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&self.dir)
    }
}

fn read_batch(path: &Path, b: &BatchIdx) -> Result<Batch, SpoolError> {
    let mut f = File::open(path).map_err(io(path))?;
    f.seek(SeekFrom::Start(b.offset + FRAME_HEADER))
        .map_err(io(path))?;
    let mut payload = vec![0u8; b.len as usize];
    f.read_exact(&mut payload).map_err(io(path))?;
    postcard::from_bytes(&payload).map_err(|e| SpoolError::Corrupt {
        path: path.to_path_buf(),
        message: format!("batch at byte {}: {e}", b.offset),
    })
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::wire::Outcome;

    pub(crate) fn rec(trial: u64, input: u32) -> Record {
        Record {
            seq: 0,
            job_id: 1,
            campaign_id: 1,
            trial_id: trial,
            attempt: 0,
            input,
            outcome: Outcome::Masked,
            mismatched_pixels: 0,
            nonfinite: 0,
            iou_vs_golden: 1.0,
            iou_vs_truth: 0.8,
            golden_iou_vs_truth: 0.8,
            latency_ns: 1000,
            cycles: 300,
            power_w: 3.0,
            vccint_mv: 850.0,
            temp_c: 40.0,
            start_unix_ns: 1,
            end_unix_ns: 2,
            detail: None,
        }
    }

    fn p(n: u64) -> Option<Progress> {
        Some(Progress {
            job_id: 1,
            next_trial: n,
        })
    }

    #[test]
    fn append_read_ack_reopen() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), 1 << 30).unwrap();
        assert_eq!(s.head(), 0);
        assert_eq!(s.append(p(1), vec![rec(0, 0), rec(0, 1)]).unwrap(), 1..=2);
        assert_eq!(s.append(p(2), vec![rec(1, 0)]).unwrap(), 3..=3);
        let all = s.read_after(0, 100).unwrap();
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(s.read_after(2, 100).unwrap().len(), 1);
        s.ack(2).unwrap();
        drop(s);
        let mut s = Spool::open(d.path(), 1 << 30).unwrap();
        assert_eq!(s.head(), 3);
        assert_eq!(s.progress(), p(2));
        assert_eq!(s.read_after(2, 100).unwrap()[0].seq, 3);
        s.ack(3).unwrap();
        assert_eq!(s.read_after(3, 100).unwrap().len(), 0);
        drop(s);
        let mut s = Spool::open(d.path(), 1 << 30).unwrap();
        assert_eq!(s.head(), 3);
        assert_eq!(s.progress(), p(2));
        assert_eq!(s.append(p(3), vec![rec(2, 0)]).unwrap(), 4..=4);
        // The controller knows more than us (state dir wiped): never reuse its seqs.
        s.ack(100).unwrap();
        assert_eq!(s.append(None, vec![rec(3, 0)]).unwrap(), 101..=101);
    }

    #[test]
    fn torn_tail_at_every_byte_is_all_or_nothing() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), 1 << 30).unwrap();
        s.append(p(1), vec![rec(0, 0)]).unwrap();
        let seg = s.segments[0].path.clone();
        let good = std::fs::metadata(&seg).unwrap().len();
        s.append(p(2), vec![rec(1, 0), rec(1, 1)]).unwrap();
        drop(s);
        let full = std::fs::read(&seg).unwrap();
        for cut in good..full.len() as u64 {
            for e in std::fs::read_dir(d.path()).unwrap() {
                let p = e.unwrap().path();
                if p != seg {
                    std::fs::remove_file(p).unwrap();
                }
            }
            std::fs::write(&seg, &full[..cut as usize]).unwrap();
            let mut s = Spool::open(d.path(), 1 << 30).unwrap();
            assert_eq!(s.head(), 1, "cut at {cut}");
            assert_eq!(s.progress(), p(1), "cut at {cut}");
            assert_eq!(s.read_after(0, 10).unwrap().len(), 1);
            // And appending after recovery works and is readable.
            assert_eq!(s.append(p(2), vec![rec(1, 0)]).unwrap(), 2..=2);
            drop(s);
            let s = Spool::open(d.path(), 1 << 30).unwrap();
            assert_eq!(s.read_after(0, 10).unwrap().len(), 2, "cut at {cut}");
        }
        // A flipped byte inside the last frame is caught by the CRC.
        let mut bad = full.clone();
        let n = bad.len();
        bad[n - 3] ^= 0x40;
        for e in std::fs::read_dir(d.path()).unwrap() {
            let p = e.unwrap().path();
            if p != seg {
                std::fs::remove_file(p).unwrap();
            }
        }
        std::fs::write(&seg, &bad).unwrap();
        let s = Spool::open(d.path(), 1 << 30).unwrap();
        assert_eq!(s.head(), 1);
    }

    #[test]
    fn rolls_segments_and_bounds_size() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), 3 << 20).unwrap();
        let mut t = 0;
        while !s.is_full() {
            let recs: Vec<Record> = (0..200).map(|i| rec(t, i)).collect();
            s.append(p(t + 1), recs).unwrap();
            t += 1;
        }
        assert!(s.segments.len() >= 3, "{} segments", s.segments.len());
        let head = s.head();
        s.ack(head).unwrap();
        assert!(!s.is_full());
        assert!(s.segments.len() <= 1, "{} segments left", s.segments.len());
        drop(s);
        // Full segments were deleted: seq and progress survive in meta.json.
        let s = Spool::open(d.path(), 3 << 20).unwrap();
        assert_eq!(s.head(), head);
        assert_eq!(s.progress(), p(t));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        /// Whatever bytes a segment holds, opening never panics: a damaged tail is cut,
        /// anything else is a named error.
        #[test]
        fn garbage_segments_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
                                        keep_valid in proptest::prelude::any::<bool>()) {
            let d = tempfile::tempdir().unwrap();
            if keep_valid {
                let mut s = Spool::open(d.path(), 1 << 20).unwrap();
                s.append(p(1), vec![rec(0, 0)]).unwrap();
            }
            let seg = d.path().join("seg-00000000000000000001.spool");
            let mut data = std::fs::read(&seg).unwrap_or_default();
            data.extend_from_slice(&bytes);
            std::fs::write(&seg, &data).unwrap();
            match Spool::open(d.path(), 1 << 20) {
                Ok(s) => {
                    let _ = s.read_after(0, 10);
                }
                Err(e) => proptest::prop_assert!(e.to_string().contains("spool")),
            }
        }
    }

    #[test]
    fn corrupt_meta_is_a_named_error() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("meta.json"), b"{not json").unwrap();
        let e = Spool::open(d.path(), 1 << 20).unwrap_err().to_string();
        assert!(e.contains("meta.json"), "{e}");
    }
}
