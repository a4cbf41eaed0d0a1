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
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3::{ffi, import_exception};

use super::errors::K2IOError;
use super::runtime::detached;
use crate::broadcast::segment::Segment;
use crate::broadcast::{
    copy_all, BucketPlan, CopyJob, ErrorKind, PublishOptions, Publisher, ReceivePlan, Subscriber,
    TensorSpec, Want, WorkerFailure,
};

import_exception!(k2.errors, BroadcastError);

/// A broadcast error as the matching `k2.errors` exception.
fn to_py(err: crate::broadcast::BroadcastError) -> PyErr {
    match err.kind {
        ErrorKind::Io => K2IOError::new_err(err.message),
        _ => BroadcastError::new_err(err.message),
    }
}

fn seconds(what: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!(
            "{what} must be a non-negative number of seconds, got {value}"
        ))
    })
}

/// Tensors packed 256-byte aligned into fixed-size buckets (see `k2.broadcast`).
///
/// Args:
///     tensors: ``(name, dtype, shape, itemsize)`` per tensor, in packing order.
///     bucket_bytes: bucket size, a positive multiple of 256.
#[pyclass(frozen, module = "k2._native", name = "BucketPlan")]
pub struct PyBucketPlan(BucketPlan);

type Spec = (String, String, Vec<u64>, u64);

#[pymethods]
impl PyBucketPlan {
    #[new]
    fn new(tensors: Vec<Spec>, bucket_bytes: u64) -> PyResult<Self> {
        let specs = tensors
            .into_iter()
            .map(|(name, dtype, shape, itemsize)| TensorSpec {
                name,
                dtype,
                shape,
                itemsize,
            })
            .collect();
        BucketPlan::new(specs, bucket_bytes)
            .map(Self)
            .map_err(to_py)
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

    /// ``(name, dtype, shape, itemsize)`` of every tensor, in plan order.
    fn tensors(&self) -> Vec<Spec> {
        self.0
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), t.dtype.clone(), t.shape.clone(), t.itemsize))
            .collect()
    }

    /// Arena offset of every tensor, in plan order.
    fn offsets(&self) -> Vec<u64> {
        (0..self.0.tensors().len())
            .map(|i| self.0.offset(i))
            .collect()
    }

    /// ``(start, end)``: the arena window of bucket ``bucket``.
    fn bucket_range(&self, bucket: usize) -> PyResult<(u64, u64)> {
        self.check_bucket(bucket)?;
        let r = self.0.bucket_range(bucket);
        Ok((r.start, r.end))
    }

    /// ``(tensor, tensor_offset, bucket_offset, nbytes)`` for every tensor piece in a bucket.
    fn chunks(&self, bucket: usize) -> PyResult<Vec<(usize, u64, u64, u64)>> {
        self.check_bucket(bucket)?;
        Ok(self
            .0
            .chunks(bucket)
            .iter()
            .map(|c| (c.tensor, c.tensor_offset, c.bucket_offset, c.len))
            .collect())
    }

    /// One subscriber's copies.
    ///
    /// Args:
    ///     wants: ``(tensor index, row ranges or None for the whole tensor)`` per wanted tensor;
    ///         row ranges are ``(start, stop)`` pairs along dim 0, laid out in the given order.
    ///
    /// Returns:
    ///     ``(landing_bytes, targets, pieces)``: the landing buffer's size; per wanted tensor
    ///     ``(tensor, landing_offset, nbytes)``; per bucket a list of
    ///     ``(bucket_offset, landing_offset, nbytes)`` copies.
    #[allow(clippy::type_complexity)]
    fn receive_plan(
        &self,
        wants: Vec<(usize, Option<Vec<(u64, u64)>>)>,
    ) -> PyResult<(u64, Vec<(usize, u64, u64)>, Vec<Vec<(u64, u64, u64)>>)> {
        let wants: Vec<Want> = wants
            .into_iter()
            .map(|(tensor, rows)| Want {
                tensor,
                rows: rows.map(|r| {
                    r.into_iter()
                        .map(|(a, b)| Range { start: a, end: b })
                        .collect()
                }),
            })
            .collect();
        let plan = ReceivePlan::new(&self.0, &wants).map_err(to_py)?;
        Ok((
            plan.landing_bytes,
            plan.targets
                .iter()
                .map(|t| (t.tensor, t.landing_offset, t.len))
                .collect(),
            plan.pieces
                .iter()
                .map(|list| {
                    list.iter()
                        .map(|p| (p.bucket_offset, p.landing_offset, p.len))
                        .collect()
                })
                .collect(),
        ))
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

fn lock<'a, T>(m: &'a Mutex<Option<T>>, what: &str) -> PyResult<MutexGuard<'a, Option<T>>> {
    let guard = m.lock().map_err(|_| {
        BroadcastError::new_err(format!("{what} is unusable after an internal error"))
    })?;
    if guard.is_none() {
        return Err(BroadcastError::new_err(format!("{what} is closed")));
    }
    Ok(guard)
}

/// The publishing end of a shared-memory segment (use ``k2.broadcast.WeightPublisher``).
#[pyclass(frozen, module = "k2._native", name = "ShmPublisher")]
pub struct PyShmPublisher(Mutex<Option<Publisher>>);

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
        let publisher = Publisher::create(&path, plan.0.clone(), options).map_err(to_py)?;
        Ok(Self(Mutex::new(Some(publisher))))
    }

    /// Whether every bucket has a slot of its own (the newest version stays whole).
    #[getter]
    fn retains(&self) -> PyResult<bool> {
        Ok(lock(&self.0, "publisher")?.as_ref().unwrap().retains())
    }

    /// The newest version delivered in full (0 before the first).
    #[getter]
    fn published_version(&self) -> PyResult<u64> {
        Ok(lock(&self.0, "publisher")?
            .as_ref()
            .unwrap()
            .published_version())
    }

    /// Every joined worker: dicts with ``worker``, ``pid``, ``state``, ``applied``, ``alive``.
    fn workers<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let statuses = lock(&self.0, "publisher")?.as_ref().unwrap().workers();
        statuses
            .into_iter()
            .map(|w| {
                let d = PyDict::new(py);
                d.set_item("worker", w.worker)?;
                d.set_item("pid", w.pid)?;
                d.set_item("state", w.state)?;
                d.set_item("applied", w.applied)?;
                d.set_item("alive", w.alive)?;
                Ok(d)
            })
            .collect()
    }

    /// Whether a live worker waits to be sent the published version.
    fn catch_up_pending(&self) -> PyResult<bool> {
        Ok(lock(&self.0, "publisher")?
            .as_ref()
            .unwrap()
            .catch_up_pending())
    }

    /// Start a round carrying ``version`` (or, with ``catch_up``, the published version to the
    /// workers that asked for it). Returns the number of workers in it.
    fn begin_round(&self, py: Python<'_>, version: u64, catch_up: bool) -> PyResult<usize> {
        detached(py, "ShmPublisher.begin_round", |cancel| {
            lock(&self.0, "publisher")?
                .as_mut()
                .unwrap()
                .begin_round(version, catch_up, cancel)
                .map_err(to_py)
        })
    }

    /// Stage and commit every bucket of the round from CPU memory, with every core.
    ///
    /// Internal (``k2.broadcast`` calls it): ``sources[t]`` is the address of plan tensor
    /// ``t``'s contiguous bytes, which the caller keeps alive and unmodified during the call.
    fn stage_all(&self, py: Python<'_>, sources: Vec<usize>) -> PyResult<()> {
        detached(py, "ShmPublisher.stage_all", |cancel| {
            let mut guard = lock(&self.0, "publisher")?;
            let publisher = guard.as_mut().unwrap();
            for bucket in 0..publisher.plan().num_buckets() {
                // SAFETY: the caller vouches for the source addresses (see above).
                unsafe { publisher.stage_from(bucket, &sources, cancel) }.map_err(to_py)?;
            }
            Ok::<_, PyErr>(())
        })
    }

    /// Re-announce every bucket of a retained segment in a catch-up round (no bytes move).
    fn resend_all(&self) -> PyResult<()> {
        let mut guard = lock(&self.0, "publisher")?;
        let publisher = guard.as_mut().unwrap();
        for bucket in 0..publisher.plan().num_buckets() {
            publisher.resend(bucket).map_err(to_py)?;
        }
        Ok(())
    }

    /// Wait (bounded) until bucket ``bucket``'s slot is free and lend it out, writable.
    fn acquire_slot(&self, py: Python<'_>, bucket: usize) -> PyResult<PyBucketLease> {
        detached(py, "ShmPublisher.acquire_slot", |cancel| {
            let mut guard = lock(&self.0, "publisher")?;
            let publisher = guard.as_mut().unwrap();
            let seg = Arc::clone(publisher.segment());
            let bytes = publisher.acquire_slot(bucket, cancel).map_err(to_py)?;
            Ok::<_, PyErr>(PyBucketLease::new(seg, bytes, bucket))
        })
    }

    /// Publish the filled slot to the workers. Refused while a view of the lease is alive.
    fn commit(&self, py: Python<'_>, lease: &PyBucketLease) -> PyResult<()> {
        lease.retire("commit")?;
        detached(py, "ShmPublisher.commit", |_| {
            lock(&self.0, "publisher")?
                .as_mut()
                .unwrap()
                .commit(lease.bucket)
                .map_err(to_py)
        })
    }

    /// Wait (bounded) for the last acknowledgements and end the round.
    ///
    /// Returns:
    ///     ``(worker, pid, reason)`` for every worker that failed during the round.
    fn finish_round(&self, py: Python<'_>) -> PyResult<Vec<(String, u64, String)>> {
        let failures = detached(py, "ShmPublisher.finish_round", |cancel| {
            lock(&self.0, "publisher")?
                .as_mut()
                .unwrap()
                .finish_round(cancel)
                .map_err(to_py)
        })?;
        Ok(failures
            .into_iter()
            .map(
                |WorkerFailure {
                     worker,
                     pid,
                     reason,
                 }| (worker, pid, reason),
            )
            .collect())
    }

    /// Close the segment: waiting workers fail at once, and the file is removed.
    fn close(&self) -> PyResult<()> {
        if let Ok(mut guard) = self.0.lock() {
            guard.take();
        }
        Ok(())
    }
}

/// A worker's end of a shared-memory segment (use ``k2.broadcast.WeightSubscriber``).
#[pyclass(frozen, module = "k2._native", name = "ShmSubscriber")]
pub struct PyShmSubscriber {
    inner: Mutex<Option<Subscriber>>,
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
            Subscriber::join(&path, &worker, timeout, verify, cancel).map_err(to_py)
        })?;
        let plan = Py::new(py, PyBucketPlan(sub.plan().clone()))?;
        let seg = Arc::clone(sub.segment());
        Ok(Self {
            inner: Mutex::new(Some(sub)),
            seg,
            plan,
        })
    }

    /// The plan announced at ``path``, read without joining (waits up to ``timeout`` seconds
    /// for a live publisher).
    #[staticmethod]
    fn announced_plan(py: Python<'_>, path: PathBuf, timeout: f64) -> PyResult<PyBucketPlan> {
        let timeout = seconds("timeout", timeout)?;
        detached(py, "ShmSubscriber.announced_plan", |cancel| {
            crate::broadcast::announced_plan(&path, timeout, cancel)
                .map(PyBucketPlan)
                .map_err(to_py)
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
        self.seg
            .control()
            .published_version
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Wait up to ``timeout`` seconds for a round that includes this worker.
    ///
    /// Returns:
    ///     ``(round, version)``, or None if no round began in time.
    fn next_round(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<(u64, u64)>> {
        let timeout = seconds("timeout", timeout)?;
        let info = detached(py, "ShmSubscriber.next_round", |cancel| {
            lock(&self.inner, "subscriber")?
                .as_mut()
                .unwrap()
                .next_round(timeout, cancel)
                .map_err(to_py)
        })?;
        Ok(info.map(|r| (r.id, r.version)))
    }

    /// Wait (bounded) for bucket ``bucket`` of the current round (verifying its checksum if
    /// asked) and lend it out.
    fn acquire(&self, py: Python<'_>, bucket: usize) -> PyResult<PyBucketLease> {
        detached(py, "ShmSubscriber.acquire", |cancel| {
            let mut guard = lock(&self.inner, "subscriber")?;
            let sub = guard.as_mut().unwrap();
            let seg = Arc::clone(sub.segment());
            let bytes = sub.acquire(bucket, cancel).map_err(to_py)?;
            Ok::<_, PyErr>(PyBucketLease::new(seg, bytes, bucket))
        })
    }

    /// Acknowledge the bucket. Refused while a view of the lease is alive; fails if the bucket
    /// was overwritten while it was read (the worker was evicted).
    fn release(&self, lease: &PyBucketLease) -> PyResult<()> {
        lease.retire("release")?;
        lock(&self.inner, "subscriber")?
            .as_mut()
            .unwrap()
            .release(lease.bucket)
            .map_err(to_py)
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
            lock(&self.inner, "subscriber")?
                .as_mut()
                .unwrap()
                .wait_whole(cancel)
                .map_err(to_py)
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
            let mut guard = lock(&self.inner, "subscriber")?;
            // SAFETY: the caller vouches for the destinations (see above).
            unsafe { guard.as_mut().unwrap().copy_in_place(&copies) }.map_err(to_py)
        })
    }

    /// Record that ``version`` is applied to the model.
    fn applied(&self, version: u64) -> PyResult<()> {
        lock(&self.inner, "subscriber")?
            .as_ref()
            .unwrap()
            .applied(version);
        Ok(())
    }

    /// After an eviction, ask to be sent the current version again.
    fn rejoin(&self) -> PyResult<()> {
        lock(&self.inner, "subscriber")?
            .as_mut()
            .unwrap()
            .rejoin()
            .map_err(to_py)
    }

    /// Leave the segment (frees this worker's record).
    fn close(&self) -> PyResult<()> {
        if let Ok(mut guard) = self.inner.lock() {
            guard.take();
        }
        Ok(())
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
    Ok(())
}
