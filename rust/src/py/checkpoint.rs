//! Bindings for [`crate::checkpoint`]: `CheckpointWriter`, `CheckpointReader` and helpers.
//!
//! Tensors cross the seam as raw bytes: the writer takes any C-contiguous buffer (a torch
//! tensor viewed as `uint8` numpy array) and writes it without copying; the reader hands back
//! `uint8` numpy arrays over its memory maps, which torch wraps without copying. Every heavy
//! call (writing, verifying) runs through [`detached`].

use std::path::PathBuf;

use numpy::ndarray::ArrayView1;
use numpy::PyArray1;
use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::closable::Closable;
use super::errors::{CheckpointError, K2IOError};
use super::record::record;
use super::runtime::detached;
use crate::checkpoint::format::{dtype_name, parse_dtype};
use crate::checkpoint::manifest::{Piece, PiecedTensor};
use crate::checkpoint::trace::{Event, FAULT_PHASES};
use crate::checkpoint::{
    plan, publish, writer, Checkpoint, CkptError, Publish, ShardSpec, TensorRef, WriteOptions,
};

/// A row piece as Python passes and gets it: `(file, stored_tensor, start, stop)`.
type PyPiece = (String, String, usize, usize);

impl From<CkptError> for PyErr {
    fn from(err: CkptError) -> PyErr {
        match err {
            CkptError::Io { .. } => K2IOError::new_err(err.to_string()),
            CkptError::Cancelled => pyo3::exceptions::PyKeyboardInterrupt::new_err("cancelled"),
            other => CheckpointError::new_err(other.to_string()),
        }
    }
}

/// A tensor as Python hands it over: `(name, dtype, shape, buffer)`.
type PyTensor<'py> = (String, String, Vec<usize>, Bound<'py, PyAny>);

/// A tensor whose bytes are still owned by a Python buffer (kept alive by `_guard`).
struct Borrowed {
    name: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    ptr: usize,
    len: usize,
    _guard: PyUntypedBuffer,
}

impl Borrowed {
    fn new((name, dtype, shape, data): PyTensor<'_>) -> PyResult<Self> {
        let buffer = PyUntypedBuffer::get(&data)?;
        if !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err(format!(
                "tensor {name:?}: buffer is not C-contiguous"
            )));
        }
        Ok(Borrowed {
            dtype: parse_dtype(&dtype)?,
            ptr: buffer.buf_ptr() as usize,
            len: buffer.len_bytes(),
            name,
            shape,
            _guard: buffer,
        })
    }

    /// # Safety
    /// The slice lives as long as `self` (whose buffer view pins the exporter's memory); the
    /// caller must only read it, and not let it outlive `self`.
    unsafe fn tensor_ref(&self) -> TensorRef<'_> {
        let data = unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) };
        TensorRef {
            name: self.name.clone(),
            dtype: self.dtype,
            shape: self.shape.clone(),
            data,
        }
    }
}

// SAFETY: the buffer guard is only dropped on the thread holding the GIL (when `Borrowed` is
// dropped after `detached` returns); worker threads only read the bytes it pins.
unsafe impl Send for Borrowed {}
unsafe impl Sync for Borrowed {}

record! {
    /// One recorded file-system operation of a commit: ``op`` is one of ``write``, ``fsync``,
    /// ``rename``, ``dir_fsync``, ``remove``; ``target`` is the new path of a rename.
    "FsEvent" PyFsEvent {
        op: String,
        path: String,
        target: Option<String>,
    }
}

record! {
    /// One stored tensor: its name, dtype name (safetensors', e.g. ``"BF16"``), shape and the
    /// shard file that holds it.
    "StoredTensor" PyStoredTensor {
        name: String,
        dtype: String,
        shape: Vec<usize>,
        file: String,
    }
}

fn events_to_py(events: Vec<Event>) -> Vec<PyFsEvent> {
    events
        .into_iter()
        .map(|e| PyFsEvent {
            op: e.op.name().to_string(),
            path: e.path.display().to_string(),
            target: e.to.map(|p| p.display().to_string()),
        })
        .collect()
}

/// Writes one checkpoint directory: shards in parallel into a temporary directory, then
/// `commit()` makes it durable, renames it into place and (optionally) moves `latest`.
///
/// Args:
///     final_dir: the checkpoint directory to create (must not exist).
///     chunk_bytes: checksum granularity in bytes.
///     durable: fsync files and directories (turn off only for benchmarks).
///     join: write shards into the staging directory another writer of `final_dir` has created
///         (the other ranks of a sharded save); such a writer hands its `part()` to that one
///         instead of committing.
#[pyclass(frozen, module = "k2._native", name = "CheckpointWriter")]
pub struct PyCheckpointWriter {
    inner: Closable<writer::CheckpointWriter>,
}

/// Borrow the buffers of tensors to write (checked shapes and dtypes).
fn borrow_all(tensors: Vec<PyTensor<'_>>) -> PyResult<Vec<Borrowed>> {
    tensors.into_iter().map(Borrowed::new).collect()
}

fn checkpoint_error(message: String) -> PyErr {
    CheckpointError::new_err(message)
}

#[pymethods]
impl PyCheckpointWriter {
    #[new]
    #[pyo3(signature = (final_dir, *, chunk_bytes = 4 << 20, durable = true, join = false))]
    fn new(
        py: Python<'_>,
        final_dir: PathBuf,
        chunk_bytes: usize,
        durable: bool,
        join: bool,
    ) -> PyResult<Self> {
        let options = WriteOptions {
            chunk_bytes,
            durable,
        };
        let writer = detached(py, "CheckpointWriter", |_| {
            if join {
                writer::CheckpointWriter::join(&final_dir, options)
            } else {
                writer::CheckpointWriter::create(&final_dir, options)
            }
        })?;
        let what = format!("the CheckpointWriter of {}", final_dir.display());
        Ok(PyCheckpointWriter {
            inner: Closable::new(writer, what, "already committed", checkpoint_error),
        })
    }

    /// Write groups of tensors, each cut into shards of at most `max_shard_bytes` (and, when
    /// large, at least one per writer thread) named `GROUP-0000i-of-0000N.safetensors`; all
    /// shards of all groups are written in parallel.
    ///
    /// Args:
    ///     groups: `[(group, [(name, dtype, shape, buffer), ...]), ...]`.
    ///     max_shard_bytes: shard size limit (a larger tensor gets a shard of its own).
    ///
    /// Returns:
    ///     The shard file names written, in order.
    fn write_groups(
        &self,
        py: Python<'_>,
        groups: Vec<(String, Vec<PyTensor<'_>>)>,
        max_shard_bytes: usize,
    ) -> PyResult<Vec<String>> {
        let groups: Vec<(String, Vec<Borrowed>)> = groups
            .into_iter()
            .map(|(g, ts)| Ok((g, borrow_all(ts)?)))
            .collect::<PyResult<_>>()?;
        self.inner.with(|w| {
            detached(py, "CheckpointWriter.write_groups", |cancel| {
                let mut shards = Vec::new();
                for (group, tensors) in &groups {
                    // SAFETY: `groups` outlives this closure and is only read.
                    let refs = tensors.iter().map(|t| unsafe { t.tensor_ref() }).collect();
                    shards.extend(plan::plan_group(group, refs, max_shard_bytes));
                }
                w.write_shards(&shards, cancel)?;
                Ok::<_, CkptError>(shards.into_iter().map(|s| s.file_name).collect())
            })
        })
    }

    /// Write one shard file holding `tensors` (a list of `(name, dtype, shape, buffer)`), listed
    /// under `group` in that group's index. Used to stream a conversion shard by shard.
    fn write_shard(
        &self,
        py: Python<'_>,
        file_name: String,
        group: String,
        tensors: Vec<PyTensor<'_>>,
    ) -> PyResult<()> {
        let tensors: Vec<Borrowed> = tensors
            .into_iter()
            .map(Borrowed::new)
            .collect::<PyResult<_>>()?;
        self.inner.with(|w| {
            detached(py, "CheckpointWriter.write_shard", |cancel| {
                // SAFETY: `tensors` outlives this closure and is only read.
                let refs = tensors.iter().map(|t| unsafe { t.tensor_ref() }).collect();
                w.write_shards(
                    &[ShardSpec {
                        file_name: file_name.clone(),
                        group: group.clone(),
                        tensors: refs,
                    }],
                    cancel,
                )
            })
        })
    }

    /// Write shard files, all in parallel: `[(file_name, group, [(name, dtype, shape, buffer),
    /// ...]), ...]`, each listed under its group in that group's index.
    fn write_shards(
        &self,
        py: Python<'_>,
        shards: Vec<(String, String, Vec<PyTensor<'_>>)>,
    ) -> PyResult<()> {
        let shards: Vec<(String, String, Vec<Borrowed>)> = shards
            .into_iter()
            .map(|(f, g, ts)| Ok((f, g, borrow_all(ts)?)))
            .collect::<PyResult<_>>()?;
        self.inner.with(|w| {
            detached(py, "CheckpointWriter.write_shards", |cancel| {
                let specs: Vec<ShardSpec<'_>> = shards
                    .iter()
                    .map(|(file_name, group, tensors)| ShardSpec {
                        file_name: file_name.clone(),
                        group: group.clone(),
                        // SAFETY: `shards` outlives this closure and is only read.
                        tensors: tensors.iter().map(|t| unsafe { t.tensor_ref() }).collect(),
                    })
                    .collect();
                w.write_shards(&specs, cancel)
            })
        })
    }

    /// A joined writer's hand-over (JSON bytes) for the committing writer's `merge_part`; the
    /// writer is finished afterwards.
    fn part<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let part = self.inner.take()?.into_part()?;
        let bytes = serde_json::to_vec(&part).expect("a part serializes");
        Ok(PyBytes::new(py, &bytes))
    }

    /// Take over the shards a joined writer wrote (its `part()` bytes).
    fn merge_part(&self, py: Python<'_>, part: Vec<u8>) -> PyResult<()> {
        let part: writer::Part = serde_json::from_slice(&part).map_err(|e| {
            CheckpointError::new_err(format!("not a checkpoint writer's part: {e}"))
        })?;
        self.inner
            .with(|w| detached(py, "CheckpointWriter.merge_part", |_| w.merge_part(part)))
    }

    /// Record a tensor stored in row pieces: its dtype name and whole shape, and its pieces as
    /// `(file, stored_tensor, start, stop)`; checked against the shards at commit.
    fn add_pieces(
        &self,
        name: String,
        dtype: String,
        shape: Vec<usize>,
        pieces: Vec<PyPiece>,
    ) -> PyResult<()> {
        let pieced = PiecedTensor {
            dtype,
            shape,
            pieces: pieces
                .into_iter()
                .map(|(file, tensor, start, stop)| Piece {
                    file,
                    tensor,
                    rows: [start, stop],
                })
                .collect(),
        };
        self.inner
            .with(|w| Ok::<_, PyErr>(w.add_pieces(&name, pieced)?))
    }

    /// Write a small non-tensor file (JSON, tokenizer files) into the checkpoint.
    fn write_file(&self, py: Python<'_>, file_name: String, data: Vec<u8>) -> PyResult<()> {
        self.inner.with(|w| {
            detached(py, "CheckpointWriter.write_file", |_| {
                w.write_file(&file_name, &data)
            })
        })
    }

    /// Make the checkpoint durable and rename it into place.
    ///
    /// Args:
    ///     publish_latest: also point the parent directory's `latest` at it.
    ///     keep_last: with `publish_latest`, keep only this many newest checkpoints.
    ///
    /// Returns:
    ///     The recorded file-system operations, in order, as `FsEvent`s.
    #[pyo3(signature = (*, publish_latest, keep_last = None))]
    fn commit(
        &self,
        py: Python<'_>,
        publish_latest: bool,
        keep_last: Option<usize>,
    ) -> PyResult<Vec<PyFsEvent>> {
        let writer = self.inner.take()?;
        let publish = if publish_latest {
            Publish::Latest { keep_last }
        } else {
            Publish::Directory
        };
        let events = detached(py, "CheckpointWriter.commit", |_| writer.commit(publish))?;
        Ok(events_to_py(events))
    }
}

/// A checkpoint directory opened for reading: shards memory-mapped, headers parsed and checked
/// against the manifest. Tensor bytes come back as `uint8` numpy arrays over the maps (no copy);
/// the arrays keep the reader alive.
///
/// Args:
///     dir: a checkpoint directory (k2's, or a Hub directory of `.safetensors` files, which can be
///         read but not verified).
#[pyclass(frozen, module = "k2._native", name = "CheckpointReader")]
pub struct PyCheckpointReader {
    inner: Checkpoint,
}

#[pymethods]
impl PyCheckpointReader {
    #[new]
    fn new(py: Python<'_>, dir: PathBuf) -> PyResult<Self> {
        let inner = detached(py, "CheckpointReader", |_| Checkpoint::open(&dir))?;
        Ok(PyCheckpointReader { inner })
    }

    /// The checkpoint directory.
    #[getter]
    fn dir(&self) -> PathBuf {
        self.inner.dir().to_path_buf()
    }

    /// Whether the directory has a manifest (and so can be verified).
    #[getter]
    fn has_manifest(&self) -> bool {
        self.inner.has_manifest()
    }

    /// Bytes the reader has hashed or copied so far (zero-copy arrays handed out unverified
    /// are not counted: the reader never touched them).
    #[getter]
    fn bytes_read(&self) -> u64 {
        self.inner.bytes_read()
    }

    /// Every tensor as a `StoredTensor`, in file order.
    fn tensors(&self) -> Vec<PyStoredTensor> {
        self.inner
            .tensors()
            .iter()
            .map(|t| PyStoredTensor {
                name: t.name.clone(),
                dtype: dtype_name(t.dtype),
                shape: t.shape.clone(),
                file: self.inner.file_name(t.file).to_string(),
            })
            .collect()
    }

    /// The tensors stored in row pieces: `[(name, dtype, shape, [(file, stored_tensor, start,
    /// stop), ...]), ...]`, pieces in row order (checked when the reader opened).
    fn pieces(&self) -> Vec<(String, String, Vec<usize>, Vec<PyPiece>)> {
        self.inner
            .pieces()
            .iter()
            .map(|(name, p)| {
                let mut pieces: Vec<PyPiece> = p
                    .pieces
                    .iter()
                    .map(|q| (q.file.clone(), q.tensor.clone(), q.rows[0], q.rows[1]))
                    .collect();
                pieces.sort_by_key(|q| q.2);
                (name.clone(), p.dtype.clone(), p.shape.clone(), pieces)
            })
            .collect()
    }

    /// Verify every chunk of every tensor, and every other file, against the manifest (in
    /// parallel). Raises `k2.errors.CheckpointError` naming the shard and tensor of a mismatch.
    fn verify(&self, py: Python<'_>) -> PyResult<()> {
        detached(py, "CheckpointReader.verify", |cancel| {
            self.inner.verify_all(cancel)
        })
    }

    /// A tensor's bytes as a `uint8` array over the memory map, verified first when `verify`.
    #[pyo3(signature = (name, *, verify = true))]
    fn array<'py>(
        slf: &Bound<'py, Self>,
        name: &str,
        verify: bool,
    ) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let inner = &slf.get().inner;
        let bytes = if verify {
            detached(slf.py(), "CheckpointReader.array", |_| {
                inner.tensor(name, true)
            })?
        } else {
            inner.tensor(name, false)? // nothing to read: no need to release the GIL
        };
        Ok(borrow_array(slf, bytes))
    }

    /// Rows `start..stop` (first dimension) of a tensor as a `uint8` array; reads and verifies
    /// only the chunks those rows overlap.
    #[pyo3(signature = (name, start, stop, *, verify = true))]
    fn rows<'py>(
        slf: &Bound<'py, Self>,
        name: &str,
        start: usize,
        stop: usize,
        verify: bool,
    ) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let inner = &slf.get().inner;
        let bytes = if verify {
            detached(slf.py(), "CheckpointReader.rows", |_| {
                inner.rows(name, start, stop, true)
            })?
        } else {
            inner.rows(name, start, stop, false)? // nothing to read: no need to release the GIL
        };
        Ok(borrow_array(slf, bytes))
    }

    /// The contents of a non-tensor file (JSON), checked against the manifest when `verify`.
    #[pyo3(signature = (name, *, verify = true))]
    fn read_file<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        verify: bool,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = detached(py, "CheckpointReader.read_file", |_| {
            self.inner.read_file(name, verify)
        })?;
        Ok(PyBytes::new(py, &bytes))
    }
}

/// A numpy `uint8` array over `bytes`, which must lie inside the reader's memory maps; the array
/// holds a reference to the reader, so the maps outlive it.
fn borrow_array<'py>(
    reader: &Bound<'py, PyCheckpointReader>,
    bytes: &[u8],
) -> Bound<'py, PyArray1<u8>> {
    let view = ArrayView1::from(bytes);
    // SAFETY: `bytes` points into a memory map owned by the reader, which is immutable (frozen)
    // and kept alive by the array's base object; the map is private copy-on-write, so numpy
    // writes through the array never reach the file or race with another process.
    unsafe { PyArray1::borrow_from_array(&view, reader.clone().into_any()) }
}

/// Cut tensors of the given byte sizes, in order, into shards of at most `max_shard_bytes`.
/// Returns the tensor indices of each shard.
#[pyfunction]
fn plan_shards(sizes: Vec<usize>, max_shard_bytes: usize) -> Vec<Vec<usize>> {
    plan::plan_shards(&sizes, max_shard_bytes.max(1))
}

/// The Hub-style file name of shard `index` (0-based) of `count` in `group`.
#[pyfunction]
fn shard_file_name(group: &str, index: usize, count: usize) -> String {
    plan::shard_file_name(group, index, count)
}

/// The checkpoint name that `ROOT/latest` holds, or None when there is no `latest`.
#[pyfunction]
fn read_latest(root: PathBuf) -> PyResult<Option<String>> {
    Ok(publish::read_latest(&root)?)
}

/// The complete checkpoints (directories with a manifest) in `root`, sorted by name.
#[pyfunction]
fn list_checkpoints(root: PathBuf) -> PyResult<Vec<String>> {
    Ok(publish::list_checkpoints(&root)?)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyCheckpointWriter>()?;
    m.add_class::<PyCheckpointReader>()?;
    m.add_class::<PyFsEvent>()?;
    m.add_class::<PyStoredTensor>()?;
    m.add_function(wrap_pyfunction!(plan_shards, m)?)?;
    m.add_function(wrap_pyfunction!(shard_file_name, m)?)?;
    m.add_function(wrap_pyfunction!(read_latest, m)?)?;
    m.add_function(wrap_pyfunction!(list_checkpoints, m)?)?;
    m.add("CHECKPOINT_FAULT_PHASES", FAULT_PHASES.to_vec())?;
    Ok(())
}
