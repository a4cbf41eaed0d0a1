//! A worker's side of the shared-memory protocol.
//!
//! A worker joins by claiming a free worker record (it starts out wanting a catch-up, so the
//! publisher sends it the current version), then for each round that includes it: waits for the
//! round to begin, and for every bucket in order acquires it (waits until the slot carries the
//! bucket's tag), copies what it needs, and releases it (acknowledges), which lets the publisher
//! reuse the slot. Every wait is bounded and names what it waited for; a worker also stops
//! waiting as soon as the publisher's process is gone, the publisher abandons the round, or the
//! publisher evicts it.
//!
//! On a retained segment (one slot per bucket) a worker may instead wait until the whole
//! version has landed in shared memory ([`Subscriber::wait_whole`]) and then copy it straight
//! into its model ([`Subscriber::copy_in_place`]), one copy instead of two and no landing
//! buffer. While it copies, its record's `reading` word tells the publisher not to overwrite
//! the slots.

use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::copy::{copy_all, CopyJob};
use super::error::{BroadcastError, ErrorKind, Result};
use super::plan::BucketPlan;
use super::segment::{now_ms, state, tag, Segment, MAX_WORKERS, NAME_BYTES};
use super::wait::{own_pid, process_alive, Backoff};
use crate::checksum::xxh3_64;
use crate::interrupt::Cancel;

/// The round a worker is taking part in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundInfo {
    pub id: u64,
    pub version: u64,
}

/// A joined worker; see the module docs. Dropping it leaves (frees its record).
pub struct Subscriber {
    seg: Arc<Segment>,
    plan: BucketPlan,
    name: String,
    record: usize,
    timeout: Duration,
    verify: bool,
    last_round: u64,
    round: Option<RoundInfo>,
    /// The next bucket to acquire in the current round.
    next: usize,
    /// Whether bucket `next` is acquired and not yet released.
    held: bool,
    /// Whether every bucket of the current round has landed in its own slot (`wait_whole`).
    whole: bool,
}

const LIVENESS_EVERY: Duration = Duration::from_millis(5);

impl Subscriber {
    /// Open the segment at `path` (waiting up to `timeout` for a live publisher to create it)
    /// and join as worker `name`. `verify` checks every bucket against the publisher's
    /// checksum (if it records them). `timeout` bounds every later wait too.
    pub fn join(
        path: &Path,
        name: &str,
        timeout: Duration,
        verify: bool,
        cancel: &Cancel,
    ) -> Result<Self> {
        if name.is_empty() || name.len() > NAME_BYTES {
            return Err(BroadcastError::plan(format!(
                "worker name {name:?} must be 1 to {NAME_BYTES} bytes long"
            )));
        }
        let seg = open_live(path, &format!("worker {name}"), timeout, cancel)?;
        let plan = seg.plan()?;
        let record = claim(&seg, name)?;
        Ok(Self {
            seg: Arc::new(seg),
            plan,
            name: name.to_string(),
            record,
            timeout,
            verify,
            last_round: 0,
            round: None,
            next: 0,
            held: false,
            whole: false,
        })
    }

    pub fn plan(&self) -> &BucketPlan {
        &self.plan
    }

    pub fn segment(&self) -> &Arc<Segment> {
        &self.seg
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The newest version the publisher delivered in full.
    pub fn published_version(&self) -> u64 {
        self.seg.control().published_version.load(Ordering::Acquire)
    }

    /// After an eviction: ask to be sent the current version again.
    pub fn rejoin(&mut self) -> Result<()> {
        let w = &self.seg.control().workers[self.record];
        let ours = w.pid.load(Ordering::Relaxed) == own_pid() && w.name() == self.name;
        let revived = ours
            && w.state
                .compare_exchange(
                    state::EVICTED,
                    state::WANTS_CATCH_UP,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok();
        if !revived {
            // The record was freed (the publisher thought this process dead): claim a new one.
            self.record = claim(&self.seg, &self.name)?;
        }
        self.round = None;
        self.held = false;
        self.whole = false;
        Ok(())
    }

    /// Fail if the publisher is gone or evicted this worker.
    fn check_standing(&self, check_publisher: bool) -> Result<()> {
        let c = self.seg.control();
        let w = &c.workers[self.record];
        let st = w.state.load(Ordering::Acquire);
        let lost = st == state::EVICTED
            || st == state::FREE
            || st == state::LEFT
            || w.pid.load(Ordering::Relaxed) != own_pid()
            || (check_publisher && w.name() != self.name);
        if lost {
            return Err(BroadcastError::new(
                ErrorKind::Evicted,
                format!("worker {}: the publisher evicted it (too slow or thought dead); rejoin to catch up", self.name),
            ));
        }
        if c.closed.load(Ordering::Acquire) != 0
            || (check_publisher && !process_alive(c.publisher_pid.load(Ordering::Relaxed)))
        {
            return Err(BroadcastError::new(
                ErrorKind::PublisherGone,
                format!(
                    "worker {}: the publisher (process {}) closed or exited",
                    self.name,
                    c.publisher_pid.load(Ordering::Relaxed)
                ),
            ));
        }
        Ok(())
    }

    /// While waiting: every [`LIVENESS_EVERY`] record a heartbeat and check that the publisher
    /// is alive; always check that this worker was not evicted and the segment is open.
    fn beat(&self, last_liveness: &mut Instant) -> Result<()> {
        let check = last_liveness.elapsed() >= LIVENESS_EVERY;
        if check {
            *last_liveness = Instant::now();
            self.seg.control().workers[self.record]
                .heartbeat_ms
                .store(now_ms(), Ordering::Relaxed);
        }
        self.check_standing(check)
    }

    /// Wait up to `timeout` for a round that includes this worker. `Ok(None)` if none began.
    pub fn next_round(&mut self, timeout: Duration, cancel: &Cancel) -> Result<Option<RoundInfo>> {
        let c = self.seg.control();
        let start = Instant::now();
        let mut last_liveness = start;
        let mut backoff = Backoff::new();
        loop {
            let s1 = c.round_seq.load(Ordering::Acquire);
            let id = c.round_id.load(Ordering::Acquire);
            let version = c.round_version.load(Ordering::Acquire);
            let audience = c.round_audience.load(Ordering::Acquire);
            fence(Ordering::Acquire);
            let stable = s1 % 2 == 0 && c.round_seq.load(Ordering::Relaxed) == s1;
            if stable && id > self.last_round && audience & (1 << self.record) != 0 {
                self.last_round = id;
                let info = RoundInfo { id, version };
                self.round = Some(info);
                self.next = 0;
                self.held = false;
                self.whole = false;
                return Ok(Some(info));
            }
            self.beat(&mut last_liveness)?;
            if start.elapsed() >= timeout {
                return Ok(None);
            }
            cancel.check()?;
            backoff.snooze();
        }
    }

    /// Wait for bucket `bucket` of the current round and return its bytes. They stay valid
    /// (the publisher does not touch the slot) until [`Subscriber::release`].
    pub fn acquire(&mut self, bucket: usize, cancel: &Cancel) -> Result<&[u8]> {
        let round = self.current_round()?;
        if self.held || self.whole || bucket != self.next || bucket >= self.plan.num_buckets() {
            return Err(BroadcastError::protocol(format!(
                "worker {}: buckets are read in order, one at a time: expected bucket {}{}, got {bucket}",
                self.name,
                self.next,
                if self.held { " to be released" } else { "" }
            )));
        }
        self.await_bucket(round, bucket, cancel)?;
        self.check_sum(round, bucket, self.landed(bucket))?;
        self.held = true;
        Ok(self.landed(bucket))
    }

    /// Retained segments only: wait until every bucket of the current round has landed
    /// (verifying checksums if asked), so that [`Subscriber::copy_in_place`] can follow.
    pub fn wait_whole(&mut self, cancel: &Cancel) -> Result<()> {
        let round = self.current_round()?;
        if !self.seg.retains() {
            return Err(BroadcastError::protocol(format!(
                "worker {}: the publisher keeps a ring of slots, not the whole version",
                self.name
            )));
        }
        if self.held || self.next != 0 {
            return Err(BroadcastError::protocol(format!(
                "worker {}: wait_whole after reading buckets one by one",
                self.name
            )));
        }
        for bucket in 0..self.plan.num_buckets() {
            self.await_bucket(round, bucket, cancel)?;
        }
        let n = self.plan.num_buckets();
        (0..n)
            .into_par_iter()
            .try_for_each(|b| self.check_sum(round, b, self.landed(b)))?;
        self.whole = true;
        Ok(())
    }

    /// After [`Subscriber::wait_whole`]: perform `copies[b]` (`(bucket_offset, dst, len)`) for
    /// every bucket `b` with every core, acknowledging each bucket once copied. Fails, before
    /// copying anything, if the round was abandoned or this worker evicted meanwhile; fails
    /// after copying if the publisher overwrote a slot during the copy (possible only once the
    /// publisher gave up waiting for this worker), in which case the destination holds a mix.
    ///
    /// # Safety
    /// Every `dst..dst + len` must be valid for writes for the whole call and untouched by
    /// anything else meanwhile, and no two may overlap.
    pub unsafe fn copy_in_place(&mut self, copies: &[Vec<(u64, usize, u64)>]) -> Result<()> {
        let round = self.current_round()?;
        if !self.whole {
            return Err(BroadcastError::protocol(format!(
                "worker {}: copy_in_place before wait_whole",
                self.name
            )));
        }
        let n = self.plan.num_buckets();
        if copies.len() != n {
            return Err(BroadcastError::protocol(format!(
                "worker {}: copies for {} buckets, the plan has {n}",
                self.name,
                copies.len()
            )));
        }
        for (b, list) in copies.iter().enumerate() {
            let len = self.landed(b).len() as u64;
            if let Some(&(off, _, l)) = list.iter().find(|&&(off, _, l)| off + l > len) {
                return Err(BroadcastError::protocol(format!(
                    "worker {}: a copy of bytes {off}..{} runs past bucket {b} ({len} bytes)",
                    self.name,
                    off + l
                )));
            }
        }
        let seg = Arc::clone(&self.seg);
        let w = &seg.control().workers[self.record];
        // Pairs with the publisher's SeqCst store of round_id before it looks for readers:
        // either it sees `reading` and waits, or this sees its new round and copies nothing.
        w.reading.store(round.id, Ordering::SeqCst);
        let result = self.copy_buckets(round, copies);
        w.reading.store(0, Ordering::SeqCst);
        self.whole = false;
        if result.is_ok() {
            self.next = self.plan.num_buckets();
        }
        result
    }

    fn copy_buckets(&self, round: RoundInfo, copies: &[Vec<(u64, usize, u64)>]) -> Result<()> {
        let c = self.seg.control();
        if c.round_id.load(Ordering::SeqCst) != round.id {
            return Err(BroadcastError::protocol(format!(
                "worker {}: the publisher abandoned version {} before it was copied; the model keeps the previous version",
                self.name, round.version
            )));
        }
        self.check_standing(false)?;
        for (bucket, list) in copies.iter().enumerate() {
            let slot = self.landed(bucket).as_ptr() as usize;
            let jobs: Vec<CopyJob> = list
                .iter()
                .map(|&(off, dst, len)| CopyJob {
                    src: slot + off as usize,
                    dst,
                    len: len as usize,
                })
                .collect();
            // SAFETY: the sources lie inside the landed bucket (checked by copy_in_place),
            // which the publisher does not overwrite while `reading` is set (bounded: see
            // below); the caller vouches for the destinations.
            unsafe { copy_all(&jobs) };
            let target = tag(round.id, bucket);
            if self.seg.bucket_slot(bucket).tag.load(Ordering::Acquire) != target {
                return Err(BroadcastError::new(
                    ErrorKind::Evicted,
                    format!(
                        "worker {}: bucket {bucket} of version {} was overwritten while it was copied into the model \
                         (the publisher gave up waiting for this worker): the model now holds a mix of versions; \
                         rejoin and update before reading it again",
                        self.name, round.version
                    ),
                ));
            }
            self.acknowledge(bucket, target);
        }
        Ok(())
    }

    fn current_round(&self) -> Result<RoundInfo> {
        self.round.ok_or_else(|| {
            BroadcastError::protocol(format!("worker {}: no round in progress", self.name))
        })
    }

    /// The bytes of bucket `bucket` in its slot (valid once its tag was seen).
    fn landed(&self, bucket: usize) -> &[u8] {
        let slot = self.seg.bucket_slot(bucket);
        let len = (slot.len.load(Ordering::Relaxed) as usize)
            .min(self.seg.control().bucket_bytes.load(Ordering::Relaxed) as usize);
        // SAFETY: the slot is bucket_bytes long (the segment was checked on open); the caller
        // saw the bucket's tag, and the publisher does not write the slot again before this
        // worker acknowledges it or is evicted (which release/copy detect via the tag).
        unsafe { std::slice::from_raw_parts(self.seg.slot_ptr(self.seg.slot_of(bucket)), len) }
    }

    /// Wait (bounded) until bucket `bucket`'s slot carries its tag of `round`.
    fn await_bucket(&self, round: RoundInfo, bucket: usize, cancel: &Cancel) -> Result<()> {
        let c = self.seg.control();
        let slot = self.seg.bucket_slot(bucket);
        let target = tag(round.id, bucket);
        let start = Instant::now();
        let mut last_liveness = start;
        let mut backoff = Backoff::new();
        while slot.tag.load(Ordering::Acquire) != target {
            if c.round_id.load(Ordering::Acquire) != round.id {
                return Err(BroadcastError::protocol(format!(
                    "worker {}: the publisher abandoned version {} before bucket {bucket}",
                    self.name, round.version
                )));
            }
            self.beat(&mut last_liveness)?;
            if start.elapsed() >= self.timeout {
                return Err(BroadcastError::new(
                    ErrorKind::Timeout,
                    format!(
                        "worker {}: the publisher (process {}) did not deliver bucket {bucket} of version {} within {:.1} s",
                        self.name,
                        c.publisher_pid.load(Ordering::Relaxed),
                        round.version,
                        self.timeout.as_secs_f64()
                    ),
                ));
            }
            cancel.check()?;
            backoff.snooze();
        }
        Ok(())
    }

    /// Check a landed bucket against the publisher's checksum, when both ends want that.
    fn check_sum(&self, round: RoundInfo, bucket: usize, bytes: &[u8]) -> Result<()> {
        let c = self.seg.control();
        if !self.verify || c.checksums.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let expected = self
            .seg
            .bucket_slot(bucket)
            .checksum
            .load(Ordering::Relaxed);
        if xxh3_64(bytes) == expected {
            return Ok(());
        }
        let names: Vec<&str> = self
            .plan
            .chunks(bucket)
            .iter()
            .map(|ch| self.plan.tensors()[ch.tensor].name.as_str())
            .collect();
        Err(BroadcastError::new(
            ErrorKind::Checksum,
            format!(
                "worker {}: bucket {bucket} of version {} fails its checksum (tensors {})",
                self.name,
                round.version,
                names.join(", ")
            ),
        ))
    }

    /// Finish with the acquired bucket: check that its bytes were not overwritten while they
    /// were read (which happens only to an evicted worker), then acknowledge it.
    pub fn release(&mut self, bucket: usize) -> Result<()> {
        let round = self.current_round()?;
        if !self.held || self.next != bucket {
            return Err(BroadcastError::protocol(format!(
                "worker {}: bucket {bucket} is not held",
                self.name
            )));
        }
        let target = tag(round.id, bucket);
        fence(Ordering::Acquire);
        if self.seg.bucket_slot(bucket).tag.load(Ordering::Acquire) != target {
            self.held = false;
            return Err(BroadcastError::new(
                ErrorKind::Evicted,
                format!(
                    "worker {}: bucket {bucket} of version {} was overwritten while it was read (the worker was evicted); rejoin to catch up",
                    self.name, round.version
                ),
            ));
        }
        self.check_standing(false)?;
        self.acknowledge(bucket, target);
        self.held = false;
        self.next += 1;
        Ok(())
    }

    /// Acknowledge bucket `bucket` (tag `target`); after the last one this worker holds the
    /// round's version.
    fn acknowledge(&self, bucket: usize, target: u64) {
        let w = &self.seg.control().workers[self.record];
        if bucket + 1 == self.plan.num_buckets() {
            let _ = w.state.compare_exchange(
                state::WANTS_CATCH_UP,
                state::CURRENT,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        w.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
        w.ack.store(target, Ordering::Release);
    }

    /// Acquire bucket `bucket`, hand its bytes to `read`, release it.
    pub fn receive(
        &mut self,
        bucket: usize,
        cancel: &Cancel,
        read: impl FnOnce(&[u8]),
    ) -> Result<()> {
        read(self.acquire(bucket, cancel)?);
        self.release(bucket)
    }

    /// Record that `version` is now applied to the worker's model.
    pub fn applied(&self, version: u64) {
        self.seg.control().workers[self.record]
            .applied
            .store(version, Ordering::Release);
    }
}

/// Open the segment at `path`, waiting up to `timeout` for a live publisher to create it.
/// `who` names the caller in error messages.
///
/// A segment whose publisher's process is gone (it exited without closing) fails at once,
/// saying so: waiting out the timeout would only delay the same error. A segment that was
/// closed properly is on its way out, so the wait goes on for a new publisher.
pub fn open_live(path: &Path, who: &str, timeout: Duration, cancel: &Cancel) -> Result<Segment> {
    let start = Instant::now();
    let mut backoff = Backoff::new();
    loop {
        let not_yet = match Segment::open(path) {
            Ok(seg) => {
                let c = seg.control();
                let pid = c.publisher_pid.load(Ordering::Relaxed);
                if c.closed.load(Ordering::Acquire) != 0 {
                    format!("its publisher (process {pid}) closed it")
                } else if !process_alive(pid) {
                    return Err(BroadcastError::new(
                        ErrorKind::PublisherGone,
                        format!(
                            "{who}: the publisher of {} (process {pid}) exited without closing it; \
                             start a publisher (it replaces the stale segment) and join again",
                            path.display()
                        ),
                    ));
                } else {
                    return Ok(seg);
                }
            }
            Err(err) => err.message,
        };
        if start.elapsed() >= timeout {
            return Err(BroadcastError::new(
                ErrorKind::Timeout,
                format!(
                    "{who}: no live publisher at {} within {:.1} s ({not_yet})",
                    path.display(),
                    timeout.as_secs_f64()
                ),
            ));
        }
        cancel.check()?;
        backoff.snooze();
    }
}

/// The plan announced at `path` (waiting up to `timeout` for a live publisher), read without
/// joining, so a worker can check its model before any bytes move. `who` names the caller.
pub fn announced_plan(
    path: &Path,
    who: &str,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<BucketPlan> {
    open_live(path, who, timeout, cancel)?.plan()
}

/// Claim a free worker record for `name`, refusing a name a live worker already uses.
fn claim(seg: &Segment, name: &str) -> Result<usize> {
    let c = seg.control();
    for w in c.workers.iter() {
        let st = w.state.load(Ordering::Acquire);
        if (st == state::CURRENT || st == state::WANTS_CATCH_UP)
            && w.name() == name
            && process_alive(w.pid.load(Ordering::Relaxed))
        {
            return Err(BroadcastError::new(
                ErrorKind::Join,
                format!(
                    "worker name {name} is already used by live process {}",
                    w.pid.load(Ordering::Relaxed)
                ),
            ));
        }
    }
    for (i, w) in c.workers.iter().enumerate() {
        if w.state
            .compare_exchange(
                state::FREE,
                state::CLAIMING,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            w.pid.store(own_pid(), Ordering::Relaxed);
            w.set_name(name);
            w.ack.store(0, Ordering::Relaxed);
            w.applied.store(0, Ordering::Relaxed);
            w.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
            w.reading.store(0, Ordering::SeqCst);
            // A joiner always asks for the current version; if none was published yet, the
            // next publish round includes it anyway.
            w.state.store(state::WANTS_CATCH_UP, Ordering::Release);
            return Ok(i);
        }
    }
    Err(BroadcastError::new(
        ErrorKind::Join,
        format!("worker {name}: all {MAX_WORKERS} worker records are taken"),
    ))
}

impl Drop for Subscriber {
    /// Leave: mark the record left if it is still this worker's (the publisher frees it
    /// between rounds).
    fn drop(&mut self) {
        let w = &self.seg.control().workers[self.record];
        if w.pid.load(Ordering::Relaxed) == own_pid() && w.name() == self.name {
            w.state.store(state::LEFT, Ordering::Release);
        }
    }
}
