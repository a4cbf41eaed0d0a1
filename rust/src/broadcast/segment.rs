//! The shared-memory segment: one file (normally under `/dev/shm`) mapped by the publisher and
//! every subscriber on the host.
//!
//! ```text
//! offset 0             Control block (atomics only; see `Control`)
//! slot_table_offset    one SlotHeader (atomics) per slot
//! plan_offset          the bucket plan as text (BucketPlan::encode), written once
//! slots_offset         num_slots bucket slots of bucket_bytes each, page aligned
//! ```
//!
//! A segment is either a *ring* of [`RING_SLOTS`] slots (bucket `b` goes to slot `b % 2`, so
//! the publisher fills one while subscribers drain the other), or *retained*: one slot per
//! bucket, so the whole newest version stays in shared memory after a round (late joiners are
//! served from it without a copy, and a subscriber may copy the whole version straight into
//! its model once it has landed).
//!
//! Every word another process may touch concurrently is an `AtomicU64`: the control block is
//! the protocol, the slots are plain bytes whose ownership the control block hands back and
//! forth (see `publisher` and `subscriber`).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapRaw;

use super::error::{BroadcastError, ErrorKind, Result};
use super::plan::BucketPlan;

/// Bucket slots of a ring segment: the publisher fills one while subscribers drain the other.
pub const RING_SLOTS: usize = 2;
/// Worker records in the control block (audiences are 64-bit masks).
pub const MAX_WORKERS: usize = 64;
/// Longest worker name, in bytes.
pub const NAME_BYTES: usize = 64;

const MAGIC: u64 = u64::from_le_bytes(*b"K2BCAST2");
const PAGE: u64 = 4096;

/// Worker record states.
pub mod state {
    /// Unused record.
    pub const FREE: u64 = 0;
    /// Being claimed by a joining worker (its name is being written).
    pub const CLAIMING: u64 = 1;
    /// Joined and holding the newest version (or none was published yet).
    pub const CURRENT: u64 = 2;
    /// Joined and waiting to be sent the current version (a late or restarted worker).
    pub const WANTS_CATCH_UP: u64 = 3;
    /// The publisher gave up on it; it must rejoin.
    pub const EVICTED: u64 = 4;
    /// The worker left; the publisher frees the record when it begins its next round.
    pub const LEFT: u64 = 5;
}

/// One bucket slot's header. `tag` names the (round, bucket) whose bytes the slot holds
/// completely, or 0 while the publisher is writing it.
#[repr(C)]
pub struct SlotHeader {
    pub tag: AtomicU64,
    pub len: AtomicU64,
    pub checksum: AtomicU64,
    _reserved: AtomicU64,
}

/// One worker's record. `ack` is the tag of the last bucket it finished reading.
#[repr(C)]
pub struct WorkerRecord {
    pub state: AtomicU64,
    pub pid: AtomicU64,
    pub ack: AtomicU64,
    /// Version the worker last applied to its model.
    pub applied: AtomicU64,
    /// Milliseconds since the Unix epoch when the worker was last seen waiting or reading.
    pub heartbeat_ms: AtomicU64,
    /// The round whose slots the worker is copying straight into its model (0: none); the
    /// publisher does not overwrite a retained segment while a live worker is in one.
    pub reading: AtomicU64,
    pub name_len: AtomicU64,
    name: [AtomicU64; NAME_BYTES / 8],
}

/// The control block at the start of the segment.
#[repr(C)]
pub struct Control {
    /// `MAGIC` once the segment is fully initialised.
    magic: AtomicU64,
    pub bucket_bytes: AtomicU64,
    pub num_buckets: AtomicU64,
    pub plan_len: AtomicU64,
    pub plan_offset: AtomicU64,
    pub slots_offset: AtomicU64,
    pub slot_stride: AtomicU64,
    pub num_slots: AtomicU64,
    pub slot_table_offset: AtomicU64,
    /// Whether the publisher records a checksum with every bucket.
    pub checksums: AtomicU64,
    pub publisher_pid: AtomicU64,
    /// Set when the publisher closes the segment.
    pub closed: AtomicU64,
    /// Seqlock over the round description below (odd while it is being rewritten).
    pub round_seq: AtomicU64,
    pub round_id: AtomicU64,
    pub round_version: AtomicU64,
    /// Bit `w` set: worker record `w` takes part in the round.
    pub round_audience: AtomicU64,
    /// The newest version every bucket of which was delivered.
    pub published_version: AtomicU64,
    pub workers: [WorkerRecord; MAX_WORKERS],
}

/// The tag of bucket `bucket` of round `round`: never 0, increasing within and across rounds.
pub fn tag(round: u64, bucket: usize) -> u64 {
    (round << 24) | (bucket as u64 + 1)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl WorkerRecord {
    /// The worker's name (valid while the record is claimed).
    pub fn name(&self) -> String {
        let len = (self.name_len.load(Ordering::Acquire) as usize).min(NAME_BYTES);
        let bytes: Vec<u8> = self
            .name
            .iter()
            .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
            .take(len)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Write `name` (at most [`NAME_BYTES`] bytes); only the claiming worker calls this.
    pub fn set_name(&self, name: &str) {
        let mut buf = [0u8; NAME_BYTES];
        buf[..name.len()].copy_from_slice(name.as_bytes());
        for (word, chunk) in self.name.iter().zip(buf.chunks_exact(8)) {
            word.store(
                u64::from_le_bytes(chunk.try_into().unwrap()),
                Ordering::Relaxed,
            );
        }
        self.name_len.store(name.len() as u64, Ordering::Release);
    }
}

/// A mapped segment. Dropping it unmaps; the publisher also removes the file (see
/// `Publisher`).
pub struct Segment {
    map: MmapRaw,
    path: PathBuf,
}

// SAFETY: the mapping is shared memory accessed through atomics (control block) or under the
// ownership protocol (slots); the raw pointer itself may move between threads.
unsafe impl Send for Segment {}
unsafe impl Sync for Segment {}

fn io_err(action: &str, path: &Path, err: std::io::Error) -> BroadcastError {
    BroadcastError::new(
        ErrorKind::Io,
        format!("cannot {action} {}: {err}", path.display()),
    )
}

impl Segment {
    /// Create (or replace) the segment at `path` for `plan`, owned by this process: a ring
    /// of [`RING_SLOTS`] slots, or (`retain`) one slot per bucket.
    ///
    /// The file is built under a temporary name and renamed into place, so a subscriber that
    /// opens `path` sees either the old segment or the complete new one.
    pub fn create(path: &Path, plan: &BucketPlan, checksums: bool, retain: bool) -> Result<Self> {
        let text = plan.encode();
        let num_slots = if retain {
            plan.num_buckets().max(1)
        } else {
            RING_SLOTS
        } as u64;
        let control_bytes = std::mem::size_of::<Control>() as u64;
        let slot_table_offset = control_bytes.div_ceil(64) * 64;
        let slot_table_bytes = num_slots * std::mem::size_of::<SlotHeader>() as u64;
        let plan_offset = (slot_table_offset + slot_table_bytes).div_ceil(PAGE) * PAGE;
        let slots_offset = (plan_offset + text.len() as u64).div_ceil(PAGE) * PAGE;
        let slot_stride = plan.bucket_bytes().div_ceil(PAGE) * PAGE;
        let total = slots_offset + slot_stride * num_slots;

        let tmp = path.with_file_name(format!(
            "{}.tmp-{}",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("k2-broadcast"),
            std::process::id()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io_err("create", &tmp, e))?;
        file.set_len(total).map_err(|e| io_err("size", &tmp, e))?;
        let map = MmapRaw::map_raw(&file).map_err(|e| io_err("map", &tmp, e))?;
        let seg = Self {
            map,
            path: path.to_path_buf(),
        };
        // SAFETY: the new mapping is `total` bytes long and private to us until the rename.
        unsafe {
            std::ptr::copy_nonoverlapping(
                text.as_ptr(),
                seg.ptr().add(plan_offset as usize),
                text.len(),
            );
        }
        let c = seg.control();
        c.bucket_bytes.store(plan.bucket_bytes(), Ordering::Relaxed);
        c.num_buckets
            .store(plan.num_buckets() as u64, Ordering::Relaxed);
        c.plan_len.store(text.len() as u64, Ordering::Relaxed);
        c.plan_offset.store(plan_offset, Ordering::Relaxed);
        c.slots_offset.store(slots_offset, Ordering::Relaxed);
        c.slot_stride.store(slot_stride, Ordering::Relaxed);
        c.num_slots.store(num_slots, Ordering::Relaxed);
        c.slot_table_offset
            .store(slot_table_offset, Ordering::Relaxed);
        c.checksums.store(u64::from(checksums), Ordering::Relaxed);
        c.publisher_pid
            .store(super::wait::own_pid(), Ordering::Relaxed);
        c.magic.store(MAGIC, Ordering::Release);
        std::fs::rename(&tmp, path).map_err(|e| io_err("rename into place", path, e))?;
        Ok(seg)
    }

    /// Map the segment at `path`. Fails with [`ErrorKind::Io`] if it does not exist (yet), and
    /// with [`ErrorKind::Layout`] if it is not a complete k2 broadcast segment.
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err("open", path, e))?;
        let len = file.metadata().map_err(|e| io_err("stat", path, e))?.len();
        if len < std::mem::size_of::<Control>() as u64 {
            return Err(BroadcastError::layout(format!(
                "{} is too short to be a k2 broadcast segment",
                path.display()
            )));
        }
        let map = MmapRaw::map_raw(&file).map_err(|e| io_err("map", path, e))?;
        let seg = Self {
            map,
            path: path.to_path_buf(),
        };
        let c = seg.control();
        if c.magic.load(Ordering::Acquire) != MAGIC {
            return Err(BroadcastError::layout(format!(
                "{} is not a k2 broadcast segment",
                path.display()
            )));
        }
        let num_slots = c.num_slots.load(Ordering::Relaxed);
        let slot_header = std::mem::size_of::<SlotHeader>() as u64;
        let table_end = num_slots
            .checked_mul(slot_header)
            .and_then(|n| n.checked_add(c.slot_table_offset.load(Ordering::Relaxed)));
        let end = c
            .slot_stride
            .load(Ordering::Relaxed)
            .checked_mul(num_slots)
            .and_then(|n| n.checked_add(c.slots_offset.load(Ordering::Relaxed)));
        let fits = |end: Option<u64>| end.is_some_and(|e| e <= len);
        if num_slots == 0 || !fits(table_end) || !fits(end) {
            return Err(BroadcastError::layout(format!(
                "{} is truncated",
                path.display()
            )));
        }
        Ok(seg)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// The control block.
    pub fn control(&self) -> &Control {
        // SAFETY: the mapping is page aligned and at least size_of::<Control>() long (checked
        // on open, sized on create); Control is only atomics, valid for any bit pattern.
        unsafe { &*(self.ptr() as *const Control) }
    }

    /// The plan this segment carries.
    pub fn plan(&self) -> Result<BucketPlan> {
        let c = self.control();
        let (off, len) = (
            c.plan_offset.load(Ordering::Relaxed),
            c.plan_len.load(Ordering::Relaxed),
        );
        // SAFETY: the plan text was written once before the magic was published and is never
        // written again; open() checked the file is long enough.
        let bytes =
            unsafe { std::slice::from_raw_parts(self.ptr().add(off as usize), len as usize) };
        let text = std::str::from_utf8(bytes).map_err(|_| {
            BroadcastError::layout(format!("{}: plan is not UTF-8", self.path.display()))
        })?;
        BucketPlan::decode(text)
    }

    /// Number of bucket slots.
    pub fn num_slots(&self) -> usize {
        self.control().num_slots.load(Ordering::Relaxed) as usize
    }

    /// Whether every bucket has a slot of its own (see the module docs).
    pub fn retains(&self) -> bool {
        self.num_slots() >= self.control().num_buckets.load(Ordering::Relaxed) as usize
    }

    /// The slot that carries bucket `bucket`.
    pub fn slot_of(&self, bucket: usize) -> usize {
        bucket % self.num_slots()
    }

    /// The header of the slot that carries bucket `bucket`.
    pub fn bucket_slot(&self, bucket: usize) -> &SlotHeader {
        self.slot(self.slot_of(bucket))
    }

    /// Slot `slot`'s header.
    pub fn slot(&self, slot: usize) -> &SlotHeader {
        assert!(slot < self.num_slots(), "slot {slot} out of range");
        let off = self.control().slot_table_offset.load(Ordering::Relaxed) as usize
            + slot * std::mem::size_of::<SlotHeader>();
        // SAFETY: the table lies inside the mapping (checked on open, sized on create), is
        // 64-byte aligned, and holds only atomics, valid for any bit pattern.
        unsafe { &*(self.ptr().add(off) as *const SlotHeader) }
    }

    /// Start of slot `slot`'s bytes (`bucket_bytes` long).
    pub fn slot_ptr(&self, slot: usize) -> *mut u8 {
        assert!(slot < self.num_slots(), "slot {slot} out of range");
        let c = self.control();
        let off = c.slots_offset.load(Ordering::Relaxed)
            + c.slot_stride.load(Ordering::Relaxed) * slot as u64;
        // SAFETY: slot < num_slots and the mapping covers every slot (checked on open).
        unsafe { self.ptr().add(off as usize) }
    }
}
