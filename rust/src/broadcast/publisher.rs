//! The publisher's side of the shared-memory protocol.
//!
//! A *round* delivers one weight version to an *audience* of worker records: a publish round
//! goes to every joined worker, a catch-up round re-sends the current version to late or
//! restarted workers. For each bucket `b` of a round the publisher
//!
//! 1. waits until every audience worker has acknowledged bucket `b - 2`, the previous occupant of
//!    slot `b % 2` (bounded: a worker that is dead or does not answer within the timeout is
//!    evicted and reported by name, and the round goes on without it);
//! 2. clears the slot's tag, fills the slot, and publishes the tag `tag(round, b)`.
//!
//! So while workers copy bucket `b` out of one slot the publisher stages bucket `b + 1` into the
//! other. The round ends when every remaining worker has acknowledged the last bucket; a publish
//! round then records its version as the published one.
//!
//! On a retained segment (one slot per bucket) step 1 never waits within a round, the newest
//! version stays whole in shared memory, and a catch-up round re-announces it without copying
//! ([`Publisher::resend`]). Before a publish round overwrites it, the publisher waits (bounded)
//! for any live worker still copying the previous version straight into its model.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::copy::{copy_all, CopyJob};
use super::error::{BroadcastError, ErrorKind, Result};
use super::plan::BucketPlan;
use super::segment::{now_ms, state, tag, Segment};
use super::wait::{own_pid, process_alive, Backoff};
use crate::checksum::xxh3_64;
use crate::interrupt::Cancel;

/// How a publisher's segment is set up.
#[derive(Debug, Clone, Copy)]
pub struct PublishOptions {
    /// Record an XXH3 checksum with every bucket.
    pub checksums: bool,
    /// One slot per bucket (the newest version stays whole in shared memory) instead of a
    /// ring of two.
    pub retain: bool,
    /// Bound on every wait for a worker.
    pub timeout: Duration,
}

/// A worker the publisher gave up on, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerFailure {
    pub worker: String,
    pub pid: u64,
    pub reason: String,
}

/// A worker as the control block shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    pub worker: String,
    pub pid: u64,
    /// `"current"`, `"catching-up"` or `"evicted"`.
    pub state: &'static str,
    /// The version it last applied.
    pub applied: u64,
    pub alive: bool,
}

struct Round {
    id: u64,
    version: u64,
    catch_up: bool,
    /// Audience records still taking part, with the pid each had when the round began.
    members: Vec<(usize, u64)>,
    failures: Vec<WorkerFailure>,
    /// The next bucket to stage.
    next: usize,
}

/// The publishing end of a shared-memory segment; see the module docs.
pub struct Publisher {
    seg: Arc<Segment>,
    plan: BucketPlan,
    timeout: Duration,
    inode: u64,
    next_round: u64,
    round: Option<Round>,
}

/// How often a waiting publisher checks that the workers it waits for are alive.
const LIVENESS_EVERY: Duration = Duration::from_millis(5);

impl Publisher {
    /// Create the segment at `path` for `plan`. Refuses if a live publisher already serves
    /// `path`.
    pub fn create(path: &Path, plan: BucketPlan, options: PublishOptions) -> Result<Self> {
        if let Ok(old) = Segment::open(path) {
            let c = old.control();
            let pid = c.publisher_pid.load(Ordering::Relaxed);
            if pid != own_pid() && c.closed.load(Ordering::Acquire) == 0 && process_alive(pid) {
                return Err(BroadcastError::new(
                    ErrorKind::Join,
                    format!(
                        "{} is already published by live process {pid}",
                        path.display()
                    ),
                ));
            }
            c.closed.store(1, Ordering::Release);
        }
        let seg = Segment::create(path, &plan, options.checksums, options.retain)?;
        let inode = std::fs::metadata(path).map(|m| m.ino()).unwrap_or(0);
        Ok(Self {
            seg: Arc::new(seg),
            plan,
            timeout: options.timeout,
            inode,
            next_round: 1,
            round: None,
        })
    }

    pub fn segment(&self) -> &Arc<Segment> {
        &self.seg
    }

    pub fn plan(&self) -> &BucketPlan {
        &self.plan
    }

    /// The newest version delivered in full.
    pub fn published_version(&self) -> u64 {
        self.seg.control().published_version.load(Ordering::Acquire)
    }

    /// Every claimed worker record.
    pub fn workers(&self) -> Vec<WorkerStatus> {
        let c = self.seg.control();
        c.workers
            .iter()
            .filter_map(|w| {
                let st = match w.state.load(Ordering::Acquire) {
                    state::CURRENT => "current",
                    state::WANTS_CATCH_UP => "catching-up",
                    state::EVICTED => "evicted",
                    _ => return None,
                };
                let pid = w.pid.load(Ordering::Relaxed);
                Some(WorkerStatus {
                    worker: w.name(),
                    pid,
                    state: st,
                    applied: w.applied.load(Ordering::Relaxed),
                    alive: process_alive(pid),
                })
            })
            .collect()
    }

    /// Whether a live worker waits for the current version (and there is one to send).
    pub fn catch_up_pending(&self) -> bool {
        self.published_version() > 0
            && self.seg.control().workers.iter().any(|w| {
                w.state.load(Ordering::Acquire) == state::WANTS_CATCH_UP
                    && process_alive(w.pid.load(Ordering::Relaxed))
            })
    }

    /// Whether the segment keeps every bucket in a slot of its own (see the module docs).
    pub fn retains(&self) -> bool {
        self.seg.retains()
    }

    /// Start a round: a publish round carrying `version`, or (`catch_up`) a round re-sending
    /// the published version to the workers that asked for it. An unfinished earlier round is
    /// abandoned (its workers see that and fail their update). Returns the audience size.
    ///
    /// On a retained segment a publish round first waits (up to the timeout) for live workers
    /// still copying the previous version straight into their models; one that does not finish
    /// is reported as failed (its model may then hold a mix, which it detects and reports).
    pub fn begin_round(&mut self, version: u64, catch_up: bool, cancel: &Cancel) -> Result<usize> {
        let c = self.seg.control();
        let version = if catch_up {
            self.published_version()
        } else {
            version
        };
        // The round description stays "being rewritten" (odd) while records are freed below,
        // so a worker that claims a freed record reads the new audience, never the old one.
        c.round_seq.fetch_add(1, Ordering::AcqRel);
        let mut members = Vec::new();
        let mut failures = Vec::new();
        for (i, w) in c.workers.iter().enumerate() {
            let st = w.state.load(Ordering::Acquire);
            let pid = w.pid.load(Ordering::Relaxed);
            let joined = st == state::CURRENT || st == state::WANTS_CATCH_UP;
            if st == state::FREE || (st == state::CLAIMING && process_alive(pid)) {
                continue;
            }
            if st == state::LEFT || !process_alive(pid) {
                // Records are freed only here, between rounds, so a joiner can never claim a
                // record that the round in flight still counts in its audience.
                if joined {
                    failures.push(WorkerFailure {
                        worker: w.name(),
                        pid,
                        reason: format!("process {pid} has exited"),
                    });
                }
                w.state.store(state::FREE, Ordering::Release);
                continue;
            }
            if st == state::WANTS_CATCH_UP || (st == state::CURRENT && !catch_up) {
                members.push((i, pid));
            }
        }
        let id = self.next_round;
        self.next_round += 1;
        c.round_id.store(id, Ordering::SeqCst);
        if self.retains() && !catch_up {
            // Pairs with the worker's SeqCst store of `reading` and reload of `round_id`: either
            // the worker sees this round begin and copies nothing, or it is seen reading here.
            self.await_in_place_readers(version, &mut failures, cancel)?;
        }
        let audience = members.iter().fold(0u64, |mask, (i, _)| mask | (1 << i));
        c.round_version.store(version, Ordering::Release);
        c.round_audience.store(audience, Ordering::Release);
        c.round_seq.fetch_add(1, Ordering::AcqRel);
        let n = members.len();
        self.round = Some(Round {
            id,
            version,
            catch_up,
            members,
            failures,
            next: 0,
        });
        Ok(n)
    }

    fn round_mut(&mut self, what: &str) -> Result<&mut Round> {
        self.round
            .as_mut()
            .ok_or_else(|| BroadcastError::protocol(format!("{what}: no round in progress")))
    }

    /// Wait until bucket `bucket`'s slot is free, clear its tag and return the slot's bytes
    /// (`bucket_range(bucket).len()` of them) for the caller to fill. Buckets go in order.
    pub fn acquire_slot(&mut self, bucket: usize, cancel: &Cancel) -> Result<&mut [u8]> {
        let (id, next) = {
            let r = self.round_mut("acquire_slot")?;
            (r.id, r.next)
        };
        if bucket != next || bucket >= self.plan.num_buckets() {
            return Err(BroadcastError::protocol(format!(
                "buckets are staged in order: expected bucket {next} of {}, got {bucket}",
                self.plan.num_buckets()
            )));
        }
        let slots = self.seg.num_slots();
        if bucket >= slots {
            self.await_acks(tag(id, bucket - slots), bucket - slots, cancel)?;
        }
        let slot = self.seg.slot_of(bucket);
        self.seg.slot(slot).tag.store(0, Ordering::Release);
        let len = self.plan.bucket_range(bucket).end - self.plan.bucket_range(bucket).start;
        // SAFETY: every audience worker acknowledged the slot's previous bucket and the tag is
        // 0, so no reader touches the slot until commit() publishes the new tag; the slot is
        // bucket_bytes >= len long; &mut self keeps a second borrow out.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.seg.slot_ptr(slot), len as usize) })
    }

    /// Publish bucket `bucket` (filled since `acquire_slot`) to the workers.
    pub fn commit(&mut self, bucket: usize) -> Result<()> {
        let id = {
            let r = self.round_mut("commit")?;
            if r.next != bucket {
                return Err(BroadcastError::protocol(format!(
                    "commit of bucket {bucket}, but bucket {} is staged",
                    r.next
                )));
            }
            r.next += 1;
            r.id
        };
        let c = self.seg.control();
        let slot = self.seg.bucket_slot(bucket);
        let range = self.plan.bucket_range(bucket);
        let len = range.end - range.start;
        if c.checksums.load(Ordering::Relaxed) != 0 {
            // SAFETY: the slot is ours until the tag is published below.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    self.seg.slot_ptr(self.seg.slot_of(bucket)),
                    len as usize,
                )
            };
            slot.checksum.store(xxh3_64(bytes), Ordering::Relaxed);
        }
        slot.len.store(len, Ordering::Relaxed);
        slot.tag.store(tag(id, bucket), Ordering::Release);
        Ok(())
    }

    /// Stage bucket `bucket`: acquire its slot, let `fill` write it, commit it.
    pub fn stage(
        &mut self,
        bucket: usize,
        cancel: &Cancel,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<()> {
        fill(self.acquire_slot(bucket, cancel)?);
        self.commit(bucket)
    }

    /// Stage bucket `bucket` from the trainer's tensors: `sources[t]` is the address of tensor
    /// `t`'s bytes (plan order), copied with every core.
    ///
    /// # Safety
    /// Each `sources[t]` must be valid for reads of the tensor's planned byte size for the whole
    /// call, and nothing may write those bytes meanwhile.
    pub unsafe fn stage_from(
        &mut self,
        bucket: usize,
        sources: &[usize],
        cancel: &Cancel,
    ) -> Result<()> {
        if sources.len() != self.plan.tensors().len() {
            return Err(BroadcastError::protocol(format!(
                "{} source addresses for a plan of {} tensors",
                sources.len(),
                self.plan.tensors().len()
            )));
        }
        let chunks = self.plan.chunks(bucket);
        let slot = self.acquire_slot(bucket, cancel)?.as_mut_ptr() as usize;
        let jobs: Vec<CopyJob> = chunks
            .iter()
            .map(|c| CopyJob {
                src: sources[c.tensor] + c.tensor_offset as usize,
                dst: slot + c.bucket_offset as usize,
                len: c.len as usize,
            })
            .collect();
        // SAFETY: the slot is ours until commit (acquire_slot), the chunks lie inside the
        // bucket and inside their tensors (the plan), and the caller vouches for the sources.
        unsafe { copy_all(&jobs) };
        self.commit(bucket)
    }

    /// Re-announce bucket `bucket`, whose slot still holds it whole from the last publish
    /// round, in the current (catch-up) round of a retained segment: no bytes move.
    pub fn resend(&mut self, bucket: usize) -> Result<()> {
        if !self.retains() {
            return Err(BroadcastError::protocol(
                "resend needs a retained segment (one slot per bucket)",
            ));
        }
        let id = {
            let r = self.round_mut("resend")?;
            if !r.catch_up || r.next != bucket {
                return Err(BroadcastError::protocol(format!(
                    "resend of bucket {bucket}: only a catch-up round's next bucket ({}) can be re-sent",
                    r.next
                )));
            }
            r.next += 1;
            r.id
        };
        self.seg
            .bucket_slot(bucket)
            .tag
            .store(tag(id, bucket), Ordering::Release);
        Ok(())
    }

    /// Wait (bounded) until no live worker copies a previous version of this retained segment
    /// straight into its model; those that do not finish in time join `failures`.
    fn await_in_place_readers(
        &self,
        version: u64,
        failures: &mut Vec<WorkerFailure>,
        cancel: &Cancel,
    ) -> Result<()> {
        let c = self.seg.control();
        let start = Instant::now();
        let mut backoff = Backoff::new();
        let mut last_liveness = start;
        loop {
            let check_liveness = last_liveness.elapsed() >= LIVENESS_EVERY;
            if check_liveness {
                last_liveness = Instant::now();
            }
            let readers: Vec<&super::segment::WorkerRecord> = c
                .workers
                .iter()
                .filter(|w| {
                    w.reading.load(Ordering::SeqCst) != 0
                        && (!check_liveness || process_alive(w.pid.load(Ordering::Relaxed)))
                })
                .collect();
            if readers.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= self.timeout {
                for w in readers {
                    failures.push(WorkerFailure {
                        worker: w.name(),
                        pid: w.pid.load(Ordering::Relaxed),
                        reason: format!(
                            "was still copying the previous version into its model after {:.1} s, \
                             when version {version} had to overwrite it",
                            self.timeout.as_secs_f64()
                        ),
                    });
                    w.state.store(state::EVICTED, Ordering::Release);
                }
                return Ok(());
            }
            cancel.check()?;
            backoff.snooze();
        }
    }

    /// Wait for the last buckets' acknowledgements and end the round. Returns the workers that
    /// failed during it (an empty list when every worker got the version).
    pub fn finish_round(&mut self, cancel: &Cancel) -> Result<Vec<WorkerFailure>> {
        let (id, next) = {
            let r = self.round_mut("finish_round")?;
            (r.id, r.next)
        };
        let n = self.plan.num_buckets();
        if next != n {
            return Err(BroadcastError::protocol(format!(
                "finish_round after {next} of {n} buckets"
            )));
        }
        if n > 0 {
            self.await_acks(tag(id, n - 1), n - 1, cancel)?;
        }
        let round = self.round.take().expect("checked above");
        if !round.catch_up {
            self.seg
                .control()
                .published_version
                .store(round.version, Ordering::Release);
        }
        Ok(round.failures)
    }

    /// Wait until every audience worker's ack reaches `target` (the tag of `bucket`). Workers
    /// that died, left, or did not answer within the timeout are evicted and recorded.
    fn await_acks(&mut self, target: u64, bucket: usize, cancel: &Cancel) -> Result<()> {
        let seg = Arc::clone(&self.seg);
        let c = seg.control();
        let timeout = self.timeout;
        let round = self.round.as_mut().expect("callers checked the round");
        let start = Instant::now();
        let mut last_liveness = start;
        let mut backoff = Backoff::new();
        loop {
            let check_liveness = last_liveness.elapsed() >= LIVENESS_EVERY;
            if check_liveness {
                last_liveness = Instant::now();
            }
            let timed_out = start.elapsed() >= timeout;
            let mut pending = false;
            let mut kept = Vec::with_capacity(round.members.len());
            for &(i, pid) in &round.members {
                let w = &c.workers[i];
                if w.ack.load(Ordering::Acquire) >= target {
                    kept.push((i, pid));
                    continue;
                }
                let st = w.state.load(Ordering::Acquire);
                let what = format!("bucket {bucket} of version {}", round.version);
                let reason = if w.pid.load(Ordering::Relaxed) != pid
                    || st == state::LEFT
                    || st == state::FREE
                {
                    Some(format!("left while {what} was in flight"))
                } else if check_liveness && !process_alive(pid) {
                    Some(format!(
                        "process {pid} exited before it finished reading {what}"
                    ))
                } else if timed_out {
                    let seen = now_ms().saturating_sub(w.heartbeat_ms.load(Ordering::Relaxed));
                    Some(format!(
                        "did not finish reading {what} within {:.1} s (last seen {:.1} s ago)",
                        timeout.as_secs_f64(),
                        seen as f64 / 1000.0
                    ))
                } else {
                    None
                };
                match reason {
                    Some(reason) => {
                        if w.pid.load(Ordering::Relaxed) == pid {
                            w.state.store(state::EVICTED, Ordering::Release);
                        }
                        round.failures.push(WorkerFailure {
                            worker: w.name(),
                            pid,
                            reason,
                        });
                    }
                    None => {
                        pending = true;
                        kept.push((i, pid));
                    }
                }
            }
            round.members = kept;
            if !pending {
                return Ok(());
            }
            cancel.check()?;
            backoff.snooze();
        }
    }
}

impl Drop for Publisher {
    /// Mark the segment closed (waiting workers fail at once) and remove its file, unless
    /// another publisher has replaced it since. A copy of the publisher in a forked child
    /// process leaves the segment alone: it belongs to the parent.
    fn drop(&mut self) {
        let c = self.seg.control();
        if c.publisher_pid.load(Ordering::Relaxed) != own_pid() {
            return;
        }
        c.closed.store(1, Ordering::Release);
        let path = self.seg.path();
        if std::fs::metadata(path).map(|m| m.ino()).ok() == Some(self.inode) {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::plan::TensorSpec;
    use super::*;

    #[test]
    fn a_live_publisher_cannot_be_replaced_but_a_closed_one_can() {
        let path = std::env::temp_dir().join(format!("k2-bcast-pub-{}", own_pid()));
        let plan = BucketPlan::new(
            vec![TensorSpec {
                name: "w".into(),
                dtype: "uint8".into(),
                shape: vec![10],
                itemsize: 1,
            }],
            256,
        )
        .unwrap();
        let options = PublishOptions {
            checksums: false,
            retain: false,
            timeout: Duration::from_secs(1),
        };
        let first = Publisher::create(&path, plan.clone(), options).unwrap();
        // Same process: a publisher may replace its own segment (e.g. after a restart of the
        // trainer object); the old one is marked closed.
        let second = Publisher::create(&path, plan, options).unwrap();
        assert_eq!(first.segment().control().closed.load(Ordering::Acquire), 1);
        drop(first); // must not remove the second publisher's file
        assert!(path.exists());
        drop(second);
        assert!(!path.exists());
    }
}
