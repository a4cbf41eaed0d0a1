//! Bindings for [`crate::broadcast`]: the bucket plan, the two ends of the shared-memory
//! protocol, and `BucketLease`, a bucket slot lent out as a zero-copy buffer.
//!
//! Waits run through [`detached`] (no GIL, Ctrl-C honoured). A lease counts the buffer views
//! taken of it; releasing (or committing) a lease while a view is alive is refused, and a
//! released lease refuses new views, so no view can ever show a slot the publisher has reused.

use std::ffi::c_int;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyKeyboardInterrupt, PyValueError};
use pyo3::prelude::*;
use pyo3::{ffi, import_exception};

use super::closable::Closable;
use super::errors::K2IOError;
use super::record::record;
use super::runtime::detached;
use crate::broadcast::segment::Segment;
use crate::broadcast::{self as bc, copy_all, BucketPlan, CopyJob, ErrorKind, PublishOptions};

import_exception!(k2.errors, BroadcastError);

impl From<bc::BroadcastError> for PyErr {
    fn from(err: bc::BroadcastError) -> PyErr {
        match err.kind {
            ErrorKind::Io => K2IOError::new_err(err.message),
            ErrorKind::Cancelled => PyKeyboardInterrupt::new_err(err.message),
            _ => BroadcastError::new_err(err.message),
        }
    }
}

fn broadcast_error(message: String) -> PyErr {
    BroadcastError::new_err(message)
}

fn seconds(what: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!(
            "{what} must be a non-negative number of seconds, got {value}"
        ))
    })
}

record! {
    /// One tensor of a bucket plan: its name, dtype name (torch's, e.g. ``"bfloat16"``),
    /// shape and element size in bytes.
    "TensorSpec" PyTensorSpec {
        name: String,
        dtype: String,
        shape: Vec<u64>,
        itemsize: u64,
    }
}

record! {
    /// A piece of tensor ``tensor`` (its index in the plan) held in a bucket: ``nbytes`` bytes
    /// from byte ``tensor_offset`` of the tensor, at byte ``bucket_offset`` of the bucket.
    "Chunk" PyChunk {
        tensor: usize,
        tensor_offset: u64,
        bucket_offset: u64,
        nbytes: u64,
    }
}

record! {
    /// A window of bytes ``start..end``.
    "ByteRange" PyByteRange {
        start: u64,
        end: u64,
    }
}

record! {
    /// Where a subscriber's wanted bytes of tensor ``tensor`` go in its landing layout:
    /// ``nbytes`` bytes at ``landing_offset``.
    "Target" PyTarget {
        tensor: usize,
        landing_offset: u64,
        nbytes: u64,
    }
}

record! {
    /// One copy of a subscriber's receive plan: ``nbytes`` bytes from ``bucket_offset`` of a
    /// bucket to ``landing_offset`` of the landing layout.
    "Piece" PyPiece {
        bucket_offset: u64,
        landing_offset: u64,
        nbytes: u64,
    }
}

record! {
    /// A subscriber's copies (see ``BucketPlan.receive_plan``): the landing layout's size,
    /// where each wanted tensor lands, and per bucket the pieces to copy.
    "ReceivePlan" PyReceivePlan {
        landing_bytes: u64,
        targets: Vec<PyTarget>,
        pieces: Vec<Vec<PyPiece>>,
    }
}

record! {
    /// A round that includes this worker: its id and the weight version it carries.
    "RoundInfo" PyRoundInfo {
        round: u64,
        version: u64,
    }
}

record! {
    /// A joined worker as the publisher sees it; ``state`` is ``"current"``,
    /// ``"catching-up"`` or ``"evicted"``, ``applied`` the version it last applied.
    "WorkerStatus" PyWorkerStatus {
        worker: String,
        pid: u64,
        state: String,
        applied: u64,
        alive: bool,
    }
}

record! {
    /// A worker the publisher gave up on during a round, and why.
    "WorkerFailure" PyWorkerFailure {
        worker: String,
        pid: u64,
        reason: String,
    }
}

impl From<&bc::TensorSpec> for PyTensorSpec {
    fn from(t: &bc::TensorSpec) -> Self {
        Self {
            name: t.name.clone(),
            dtype: t.dtype.clone(),
            shape: t.shape.clone(),
            itemsize: t.itemsize,
        }
    }
}

/// A tensor spec as Python may give it: a ``TensorSpec`` or a ``(name, dtype, shape,
/// itemsize)`` tuple.
#[derive(FromPyObject)]
enum SpecArg<'py> {
    Typed(PyRef<'py, PyTensorSpec>),
    Tuple(String, String, Vec<u64>, u64),
}

impl From<SpecArg<'_>> for bc::TensorSpec {
    fn from(arg: SpecArg<'_>) -> Self {
        let (name, dtype, shape, itemsize) = match arg {
            SpecArg::Typed(t) => (t.name.clone(), t.dtype.clone(), t.shape.clone(), t.itemsize),
            SpecArg::Tuple(name, dtype, shape, itemsize) => (name, dtype, shape, itemsize),
        };
        bc::TensorSpec {
            name,
            dtype,
            shape,
            itemsize,
        }
    }
}

/// Tensors packed 256-byte aligned into fixed-size buckets (see `k2.broadcast`).
///
/// Args:
///     tensors: a ``TensorSpec`` (or ``(name, dtype, shape, itemsize)`` tuple) per tensor, in
///         packing order.
///     bucket_bytes: bucket size, a positive multiple of 256.
#[pyclass(frozen, module = "k2._native", name = "BucketPlan")]
pub struct PyBucketPlan(BucketPlan);

#[pymethods]
impl PyBucketPlan {
    #[new]
    fn new(tensors: Vec<SpecArg<'_>>, bucket_bytes: u64) -> PyResult<Self> {
        let specs = tensors.into_iter().map(bc::TensorSpec::from).collect();
        Ok(Self(BucketPlan::new(specs, bucket_bytes)?))
    }

    #[getter]
    fn bucket_bytes(&self) -> u64 {
        self.0.bucket_bytes()
    }

    #[getter]
    fn num_buckets(&self) -> usize {
        self.0.num_buckets()
    }

    #[getter]
    fn arena_bytes(&self) -> u64 {
        self.0.arena_bytes()
    }

    /// Every tensor's ``TensorSpec``, in plan order.
    fn tensors(&self) -> Vec<PyTensorSpec> {
        self.0.tensors().iter().map(PyTensorSpec::from).collect()
    }

    /// Arena offset of every tensor, in plan order.
    fn offsets(&self) -> Vec<u64> {
        (0..self.0.tensors().len())
            .map(|i| self.0.offset(i))
            .collect()
    }

    /// The arena window of bucket ``bucket``.
    fn bucket_range(&self, bucket: usize) -> PyResult<PyByteRange> {
        self.check_bucket(bucket)?;
        let r = self.0.bucket_range(bucket);
        Ok(PyByteRange {
            start: r.start,
            end: r.end,
        })
    }

    /// Every tensor piece held in bucket ``bucket``, in bucket order.
    fn chunks(&self, bucket: usize) -> PyResult<Vec<PyChunk>> {
        self.check_bucket(bucket)?;
        Ok(self
            .0
            .chunks(bucket)
            .iter()
            .map(|c| PyChunk {
                tensor: c.tensor,
                tensor_offset: c.tensor_offset,
                bucket_offset: c.bucket_offset,
                nbytes: c.len,
            })
            .collect())
    }

    /// One subscriber's copies.
    ///
    /// Args:
    ///     wants: ``(tensor index, row ranges or None for the whole tensor)`` per wanted tensor;
    ///         row ranges are ``(start, stop)`` pairs along dim 0, laid out in the given order.
    #[allow(clippy::type_complexity)]
    fn receive_plan(
        &self,
        wants: Vec<(usize, Option<Vec<(u64, u64)>>)>,
    ) -> PyResult<PyReceivePlan> {
        let wants: Vec<bc::Want> = wants
            .into_iter()
            .map(|(tensor, rows)| bc::Want {
                tensor,
                rows: rows.map(|r| {
                    r.into_iter()
                        .map(|(start, end)| Range { start, end })
                        .collect()
                }),
            })
            .collect();
        let plan = bc::ReceivePlan::new(&self.0, &wants)?;
        Ok(PyReceivePlan {
            landing_bytes: plan.landing_bytes,
            targets: plan
                .targets
                .iter()
                .map(|t| PyTarget {
                    tensor: t.tensor,
                    landing_offset: t.landing_offset,
                    nbytes: t.len,
                })
                .collect(),
            pieces: plan
                .pieces
                .iter()
                .map(|list| {
                    list.iter()
                        .map(|p| PyPiece {
                            bucket_offset: p.bucket_offset,
                            landing_offset: p.landing_offset,
                            nbytes: p.len,
                        })
                        .collect()
                })
                .collect(),
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "BucketPlan({} tensors, {} buckets of {} bytes)",
            self.0.tensors().len(),
            self.0.num_buckets(),
            self.0.bucket_bytes()
        )
    }
}

impl PyBucketPlan {
    fn check_bucket(&self, bucket: usize) -> PyResult<()> {
        if bucket >= self.0.num_buckets() {
            return Err(PyValueError::new_err(format!(
                "bucket {bucket} is outside the plan's {} buckets",
                self.0.num_buckets()
            )));
        }
        Ok(())
    }
}

/// A bucket slot lent out: a buffer (``memoryview(lease)``, ``torch.frombuffer``) over the
/// shared memory itself, valid until the lease is released (subscriber) or committed
/// (publisher). Subscribers must treat it as read-only.
#[pyclass(frozen, module = "k2._native", name = "BucketLease")]
pub struct PyBucketLease {
    /// Keeps the mapping alive while the lease (and so any view of it) exists.
    _mapping: Arc<Segment>,
    ptr: usize,
    len: usize,
    bucket: usize,
    released: AtomicBool,
    views: AtomicUsize,
}

#[pymethods]
impl PyBucketLease {
    /// The bucket's index in the plan.
    #[getter]
    fn bucket(&self) -> usize {
        self.bucket
    }

    /// The bucket's length in bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.len
    }

    /// Whether the lease was released (no new views can be taken).
    #[getter]
    fn released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// Buffer views of the lease currently alive.
    #[getter]
    fn views(&self) -> usize {
        self.views.load(Ordering::Acquire)
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let lease = slf.get();
        if lease.released.load(Ordering::Acquire) {
            return Err(BroadcastError::new_err(format!(
                "bucket {} was released: its views are no longer valid",
                lease.bucket
            )));
        }
        // SAFETY: ptr/len lie inside the mapping that `seg` keeps alive for as long as this
        // object lives, and the view holds a reference to this object.
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                lease.ptr as *mut _,
                lease.len as ffi::Py_ssize_t,
                0,
                flags,
            )
        };
        if rc != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        lease.views.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        self.views.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PyBucketLease {
    fn new(seg: Arc<Segment>, bytes: &[u8], bucket: usize) -> Self {
        Self {
            _mapping: seg,
            ptr: bytes.as_ptr() as usize,
            len: bytes.len(),
            bucket,
            released: AtomicBool::new(false),
            views: AtomicUsize::new(0),
        }
    }

    /// Mark released; refused while views are alive.
    fn retire(&self, verb: &str) -> PyResult<()> {
        let views = self.views.load(Ordering::Acquire);
        if views > 0 {
            return Err(BroadcastError::new_err(format!(
                "cannot {verb} bucket {}: {views} view(s) of it are still alive (drop them first)",
                self.bucket
            )));
        }
        if self.released.swap(true, Ordering::AcqRel) {
            return Err(BroadcastError::new_err(format!(
                "bucket {} was already released",
                self.bucket
            )));
        }
        Ok(())
    }
}

/// The publishing end of a shared-memory segment (use ``k2.broadcast.WeightPublisher``).
#[pyclass(frozen, module = "k2._native", name = "ShmPublisher")]
pub struct PyShmPublisher(Closable<bc::Publisher>);

#[pymethods]
impl PyShmPublisher {
    /// Create the segment at ``path``: a ring of two slots, or (``retain``) one per bucket.
    #[new]
    fn new(
        path: PathBuf,
        plan: &PyBucketPlan,
        checksums: bool,
        timeout: f64,
        retain: bool,
    ) -> PyResult<Self> {
        let options = PublishOptions {
            checksums,
            retain,
            timeout: seconds("timeout", timeout)?,
        };
        let publisher = bc::Publisher::create(&path, plan.0.clone(), options)?;
        let what = format!("the publisher of {}", path.display());
        Ok(Self(Closable::new(
            publisher,
            what,
            "closed",
            broadcast_error,
        )))
    }

    /// Whether every bucket has a slot of its own (the newest version stays whole).
    #[getter]
    fn retains(&self) -> PyResult<bool> {
        self.0.with(|p| Ok::<_, PyErr>(p.retains()))
    }

    /// The newest version delivered in full (0 before the first).
    #[getter]
    fn published_version(&self) -> PyResult<u64> {
        self.0.with(|p| Ok::<_, PyErr>(p.published_version()))
    }

    /// Every joined worker.
    fn workers(&self) -> PyResult<Vec<PyWorkerStatus>> {
        let statuses = self.0.with(|p| Ok::<_, PyErr>(p.workers()))?;
        Ok(statuses
            .into_iter()
            .map(|w| PyWorkerStatus {
                worker: w.worker,
                pid: w.pid,
                state: w.state.to_string(),
                applied: w.applied,
                alive: w.alive,
            })
            .collect())
    }

    /// Whether a live worker waits to be sent the published version.
    fn catch_up_pending(&self) -> PyResult<bool> {
        self.0.with(|p| Ok::<_, PyErr>(p.catch_up_pending()))
    }

    /// Start a round carrying ``version`` (or, with ``catch_up``, the published version to the
    /// workers that asked for it). Returns the number of workers in it.
    fn begin_round(&self, py: Python<'_>, version: u64, catch_up: bool) -> PyResult<usize> {
        detached(py, "ShmPublisher.begin_round", |cancel| {
            self.0.with(|p| p.begin_round(version, catch_up, cancel))
        })
    }

    /// Stage and commit every bucket of the round from CPU memory, with every core.
    ///
    /// Internal (``k2.broadcast`` calls it): ``sources[t]`` is the address of plan tensor
    /// ``t``'s contiguous bytes, which the caller keeps alive and unmodified during the call.
    fn stage_all(&self, py: Python<'_>, sources: Vec<usize>) -> PyResult<()> {
        detached(py, "ShmPublisher.stage_all", |cancel| {
            self.0.with(|p| {
                for bucket in 0..p.plan().num_buckets() {
                    // SAFETY: the caller vouches for the source addresses (see above).
                    unsafe { p.stage_from(bucket, &sources, cancel) }?;
                }
                Ok::<_, bc::BroadcastError>(())
            })
        })
    }

    /// Re-announce every bucket of a retained segment in a catch-up round (no bytes move).
    fn resend_all(&self) -> PyResult<()> {
        self.0
            .with(|p| (0..p.plan().num_buckets()).try_for_each(|bucket| p.resend(bucket)))
    }

    /// Wait (bounded) until bucket ``bucket``'s slot is free and lend it out, writable.
    fn acquire_slot(&self, py: Python<'_>, bucket: usize) -> PyResult<PyBucketLease> {
        detached(py, "ShmPublisher.acquire_slot", |cancel| {
            self.0.with(|p| {
                let seg = Arc::clone(p.segment());
                let bytes = p.acquire_slot(bucket, cancel)?;
                Ok::<_, bc::BroadcastError>(PyBucketLease::new(seg, bytes, bucket))
            })
        })
    }

    /// Publish the filled slot to the workers. Refused while a view of the lease is alive.
    fn commit(&self, py: Python<'_>, lease: &PyBucketLease) -> PyResult<()> {
        lease.retire("commit")?;
        detached(py, "ShmPublisher.commit", |_| {
            self.0.with(|p| p.commit(lease.bucket))
        })
    }

    /// Wait (bounded) for the last acknowledgements and end the round; returns every worker
    /// that failed during the round.
    fn finish_round(&self, py: Python<'_>) -> PyResult<Vec<PyWorkerFailure>> {
        let failures = detached(py, "ShmPublisher.finish_round", |cancel| {
            self.0.with(|p| p.finish_round(cancel))
        })?;
        Ok(failures
            .into_iter()
            .map(|f| PyWorkerFailure {
                worker: f.worker,
                pid: f.pid,
                reason: f.reason,
            })
            .collect())
    }

    /// Close the segment: waiting workers fail at once, and the file is removed.
    fn close(&self) {
        self.0.close();
    }
}

/// A worker's end of a shared-memory segment (use ``k2.broadcast.WeightSubscriber``).
#[pyclass(frozen, module = "k2._native", name = "ShmSubscriber")]
pub struct PyShmSubscriber {
    inner: Closable<bc::Subscriber>,
    /// The mapping, for lock-free reads of the control block.
    seg: Arc<Segment>,
    plan: Py<PyBucketPlan>,
}

#[pymethods]
impl PyShmSubscriber {
    /// Join the segment at ``path`` as ``worker``, waiting up to ``timeout`` seconds for a
    /// live publisher; ``timeout`` also bounds every later wait.
    #[new]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        worker: String,
        timeout: f64,
        verify: bool,
    ) -> PyResult<Self> {
        let timeout = seconds("timeout", timeout)?;
        let sub = detached(py, "ShmSubscriber", |cancel| {
            bc::Subscriber::join(&path, &worker, timeout, verify, cancel)
        })?;
        let plan = Py::new(py, PyBucketPlan(sub.plan().clone()))?;
        let seg = Arc::clone(sub.segment());
        Ok(Self {
            inner: Closable::new(sub, format!("worker {worker}"), "closed", broadcast_error),
            seg,
            plan,
        })
    }

    /// The plan announced at ``path``, read without joining: waits up to ``timeout`` seconds
    /// for a live publisher; ``worker`` names the caller in errors.
    #[staticmethod]
    fn announced_plan(
        py: Python<'_>,
        path: PathBuf,
        worker: String,
        timeout: f64,
    ) -> PyResult<PyBucketPlan> {
        let timeout = seconds("timeout", timeout)?;
        detached(py, "ShmSubscriber.announced_plan", |cancel| {
            bc::announced_plan(&path, &format!("worker {worker}"), timeout, cancel)
                .map(PyBucketPlan)
        })
    }

    /// The plan the publisher announced.
    #[getter]
    fn plan(&self, py: Python<'_>) -> Py<PyBucketPlan> {
        self.plan.clone_ref(py)
    }

    /// The newest version the publisher delivered in full.
    #[getter]
    fn published_version(&self) -> u64 {
        self.seg.control().published_version.load(Ordering::Acquire)
    }

    /// Wait up to ``timeout`` seconds for a round that includes this worker; None if no round
    /// began in time.
    fn next_round(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<PyRoundInfo>> {
        let timeout = seconds("timeout", timeout)?;
        let info = detached(py, "ShmSubscriber.next_round", |cancel| {
            self.inner.with(|s| s.next_round(timeout, cancel))
        })?;
        Ok(info.map(|r| PyRoundInfo {
            round: r.id,
            version: r.version,
        }))
    }

    /// Wait (bounded) for bucket ``bucket`` of the current round (verifying its checksum if
    /// asked) and lend it out.
    fn acquire(&self, py: Python<'_>, bucket: usize) -> PyResult<PyBucketLease> {
        detached(py, "ShmSubscriber.acquire", |cancel| {
            self.inner.with(|s| {
                let seg = Arc::clone(s.segment());
                let bytes = s.acquire(bucket, cancel)?;
                Ok::<_, bc::BroadcastError>(PyBucketLease::new(seg, bytes, bucket))
            })
        })
    }

    /// Acknowledge the bucket. Refused while a view of the lease is alive; fails if the bucket
    /// was overwritten while it was read (the worker was evicted).
    fn release(&self, lease: &PyBucketLease) -> PyResult<()> {
        lease.retire("release")?;
        self.inner.with(|s| s.release(lease.bucket))
    }

    /// Whether the publisher keeps the whole version in shared memory (one slot per bucket),
    /// which :meth:`wait_whole` and :meth:`copy_in_place` need.
    #[getter]
    fn retains(&self) -> bool {
        self.seg.retains()
    }

    /// Wait (bounded) until every bucket of the current round has landed, verifying checksums
    /// if asked.
    fn wait_whole(&self, py: Python<'_>) -> PyResult<()> {
        detached(py, "ShmSubscriber.wait_whole", |cancel| {
            self.inner.with(|s| s.wait_whole(cancel))
        })
    }

    /// After :meth:`wait_whole`: copy the landed version straight into memory, with every core,
    /// acknowledging each bucket as it is done.
    ///
    /// Internal (``k2.broadcast`` calls it): ``copies[b]`` lists ``(bucket_offset, address,
    /// nbytes)`` for bucket ``b``; every destination range must be memory the caller owns,
    /// keeps alive and lets nothing else touch during the call, and no two may overlap.
    fn copy_in_place(&self, py: Python<'_>, copies: Vec<Vec<(u64, usize, u64)>>) -> PyResult<()> {
        detached(py, "ShmSubscriber.copy_in_place", |_| {
            // SAFETY: the caller vouches for the destinations (see above).
            self.inner.with(|s| unsafe { s.copy_in_place(&copies) })
        })
    }

    /// Record that ``version`` is applied to the model.
    fn applied(&self, version: u64) -> PyResult<()> {
        self.inner.with(|s| {
            s.applied(version);
            Ok::<_, PyErr>(())
        })
    }

    /// After an eviction, ask to be sent the current version again.
    fn rejoin(&self) -> PyResult<()> {
        self.inner.with(|s| s.rejoin())
    }

    /// Leave the segment (frees this worker's record).
    fn close(&self) {
        self.inner.close();
    }
}

/// Internal (``k2.broadcast.layout.copy_bytes`` calls it): perform ``(src, dst, nbytes)``
/// copies between raw addresses with every core, the GIL released, streaming stores for long
/// ones. The caller keeps every range alive, untouched by anything else, and disjoint.
#[pyfunction]
fn copy_ranges(py: Python<'_>, jobs: Vec<(usize, usize, usize)>) -> PyResult<()> {
    let jobs: Vec<CopyJob> = jobs
        .into_iter()
        .map(|(src, dst, len)| CopyJob { src, dst, len })
        .collect();
    detached(py, "copy_ranges", |_| {
        // SAFETY: the caller vouches for the ranges (see above).
        unsafe { copy_all(&jobs) };
        Ok::<_, PyErr>(())
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(copy_ranges, m)?)?;
    m.add_class::<PyBucketPlan>()?;
    m.add_class::<PyBucketLease>()?;
    m.add_class::<PyShmPublisher>()?;
    m.add_class::<PyShmSubscriber>()?;
    m.add_class::<PyTensorSpec>()?;
    m.add_class::<PyChunk>()?;
    m.add_class::<PyByteRange>()?;
    m.add_class::<PyTarget>()?;
    m.add_class::<PyPiece>()?;
    m.add_class::<PyReceivePlan>()?;
    m.add_class::<PyRoundInfo>()?;
    m.add_class::<PyWorkerStatus>()?;
    m.add_class::<PyWorkerFailure>()?;
    Ok(())
}
