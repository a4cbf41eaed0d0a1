//! Bindings for [`crate::data`]: the shard writer and the token loader, whose batches reach
//! numpy without a copy (each array's base is a [`PyBatchBuffer`] holding a pooled buffer).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use numpy::ndarray::ArrayView2;
use numpy::{PyArray2, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::import_exception;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::closable::Closable;
use super::errors::{K2Error, K2IOError};
use super::runtime::detached;
use crate::data::pool::BufferPool;
use crate::data::{self, Batch, LoaderConfig, LoaderState};

import_exception!(k2.errors, DataError);

/// How long a waiting `next_batch` sleeps without the GIL before it checks for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

impl From<data::DataError> for PyErr {
    fn from(err: data::DataError) -> PyErr {
        match err {
            data::DataError::Io { .. } => K2IOError::new_err(err.to_string()),
            _ => DataError::new_err(err.to_string()),
        }
    }
}

/// Writes one token shard (see `docs/token-shards.md`), document by document. The shard
/// appears under its name only once `finish()` succeeds.
#[pyclass(frozen, module = "k2._native", name = "ShardWriter")]
struct PyShardWriter {
    path: PathBuf,
    writer: Closable<data::ShardWriter>,
}

fn data_error(message: String) -> PyErr {
    DataError::new_err(message)
}

#[pymethods]
impl PyShardWriter {
    #[new]
    #[pyo3(signature = (path, vocab_size, loss_mask=false))]
    fn new(path: PathBuf, vocab_size: u32, loss_mask: bool) -> PyResult<Self> {
        let writer = data::ShardWriter::create_with(&path, vocab_size, loss_mask)?;
        let what = format!("the shard writer of {}", path.display());
        Ok(Self {
            path,
            writer: Closable::new(writer, what, "already finished", data_error),
        })
    }

    /// Append documents: `tokens` (uint32) holds them back to back, `lengths` (int64) gives
    /// each one's token count, and `loss_mask` (uint8, one 0/1 per token) is required exactly
    /// when the writer was created with `loss_mask=True`. The write runs without the GIL.
    #[pyo3(signature = (tokens, lengths, loss_mask=None))]
    fn add_documents(
        &self,
        py: Python<'_>,
        tokens: PyReadonlyArray1<'_, u32>,
        lengths: PyReadonlyArray1<'_, i64>,
        loss_mask: Option<PyReadonlyArray1<'_, u8>>,
    ) -> PyResult<()> {
        let tokens = tokens.as_slice()?;
        let lengths = lengths.as_slice()?;
        let mask = match &loss_mask {
            Some(m) => Some(m.as_slice()?),
            None => None,
        };
        if let Some(m) = mask {
            if m.len() != tokens.len() {
                return Err(DataError::new_err(format!(
                    "{}: {} loss-mask values for {} tokens",
                    self.path.display(),
                    m.len(),
                    tokens.len()
                )));
            }
        }
        let total: i64 = lengths.iter().sum();
        if lengths.iter().any(|&n| n < 0) || total != tokens.len() as i64 {
            return Err(DataError::new_err(format!(
                "{}: document lengths sum to {total}, but {} tokens were given",
                self.path.display(),
                tokens.len()
            )));
        }
        detached(py, "ShardWriter.add_documents", |_| {
            self.writer.with(|writer| {
                let mut start = 0;
                for &n in lengths {
                    let end = start + n as usize;
                    match mask {
                        Some(m) => {
                            writer.add_masked_document(&tokens[start..end], &m[start..end])?
                        }
                        None => writer.add_document(&tokens[start..end])?,
                    }
                    start = end;
                }
                Ok::<_, data::DataError>(())
            })
        })
    }

    /// Complete the shard; returns `{"tokens", "documents", "checksum"}`.
    fn finish<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let writer = self.writer.take()?;
        let summary = detached(py, "ShardWriter.finish", |_| writer.finish())?;
        let out = PyDict::new(py);
        out.set_item("tokens", summary.token_count)?;
        out.set_item("documents", summary.doc_count)?;
        out.set_item("checksum", summary.checksum)?;
        Ok(out)
    }
}

/// Read a shard's header and verify it fully; returns
/// `{"version", "vocab_size", "token_bytes", "tokens", "documents", "checksum", "loss_mask"}`.
#[pyfunction]
fn inspect_shard<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let header = detached(py, "inspect_shard", |_| {
        data::Shard::open(&path, true).map(|shard| *shard.header())
    })?;
    let out = PyDict::new(py);
    out.set_item("version", header.version)?;
    out.set_item("vocab_size", header.vocab_size)?;
    out.set_item("token_bytes", header.token_bytes)?;
    out.set_item("tokens", header.token_count)?;
    out.set_item("documents", header.doc_count)?;
    out.set_item("checksum", header.checksum)?;
    out.set_item("loss_mask", header.has_loss_mask())?;
    Ok(out)
}

/// The native token loader; use it through `k2.data.TokenLoader`.
#[pyclass(frozen, module = "k2._native", name = "TokenLoader")]
struct PyTokenLoader {
    inner: data::TokenLoader,
}

/// The memory behind one batch array: a buffer from the loader's pool, which goes back to the
/// pool when numpy frees the last array that uses it.
#[pyclass(frozen, module = "k2._native", name = "BatchBuffer")]
struct PyBatchBuffer {
    data: Vec<i64>,
    pool: Arc<BufferPool>,
}

impl Drop for PyBatchBuffer {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.data));
    }
}

/// A `[rows, cols]` int64 numpy array over `data`, without copying; the array owns the buffer.
/// One batch from `TokenLoader.next_batch()`: `inputs`, `targets` and `positions` as int64
/// `[batch_size, seq_len]` arrays, the `epoch` and `step` it belongs to, and `loss_mask` (the
/// targets' 0/1 mask, 1 = train on it), None when no shard carries a mask.
#[pyclass(frozen, module = "k2._native", name = "TokenBatch")]
pub struct PyTokenBatch {
    #[pyo3(get)]
    inputs: Py<PyArray2<i64>>,
    #[pyo3(get)]
    targets: Py<PyArray2<i64>>,
    #[pyo3(get)]
    positions: Py<PyArray2<i64>>,
    #[pyo3(get)]
    epoch: u64,
    #[pyo3(get)]
    step: u64,
    #[pyo3(get)]
    loss_mask: Option<Py<PyArray2<i64>>>,
}

#[pymethods]
impl PyTokenBatch {
    fn __repr__(&self, py: Python<'_>) -> String {
        let shape = self.inputs.bind(py).shape().to_vec();
        format!(
            "TokenBatch(epoch={}, step={}, shape={:?}, loss_mask={})",
            self.epoch,
            self.step,
            shape,
            if self.loss_mask.is_some() { "array" } else { "None" }
        )
    }
}

fn to_numpy<'py>(
    py: Python<'py>,
    rows: usize,
    cols: usize,
    data: Vec<i64>,
    pool: &Arc<BufferPool>,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    assert_eq!(
        data.len(),
        rows * cols,
        "a batch array holds rows * cols tokens"
    );
    let owner = Bound::new(
        py,
        PyBatchBuffer {
            data,
            pool: Arc::clone(pool),
        },
    )?;
    let view = ArrayView2::from_shape((rows, cols), owner.get().data.as_slice())
        .expect("the shape matches the length");
    // SAFETY: `owner` becomes the array's base object, so it (and the Vec it holds) lives as
    // long as the array; the Vec is never modified or reallocated while it is in the owner.
    Ok(unsafe { PyArray2::borrow_from_array(&view, owner.clone().into_any()) })
}

const STATE_FIELDS: [&str; 7] = [
    "epoch",
    "step",
    "seed",
    "seq_len",
    "global_batch",
    "num_samples",
    "fingerprint",
];

#[pymethods]
impl PyTokenLoader {
    #[new]
    #[pyo3(signature = (paths, seq_len, batch_size, seed=0, rank=0, world_size=1, prefetch=4, threads=2, verify=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        paths: Vec<PathBuf>,
        seq_len: u64,
        batch_size: u64,
        seed: u64,
        rank: u64,
        world_size: u64,
        prefetch: usize,
        threads: usize,
        verify: bool,
    ) -> PyResult<Self> {
        let config = LoaderConfig {
            seq_len,
            batch_size,
            seed,
            rank,
            world_size,
            prefetch,
            threads,
        };
        let inner = detached(py, "TokenLoader", |_| {
            data::TokenLoader::open(&paths, config, verify)
        })?;
        Ok(Self { inner })
    }

    /// Steps per epoch, the same on every rank.
    #[getter]
    fn steps_per_epoch(&self) -> u64 {
        self.inner.steps_per_epoch()
    }

    /// Samples in the stream (before dropping the remainder of each epoch).
    #[getter]
    fn num_samples(&self) -> u64 {
        self.inner.plan().num_samples
    }

    /// Whether any shard carries a loss mask (else every mask is all ones).
    #[getter]
    fn has_loss_mask(&self) -> bool {
        self.inner.stream().has_loss_mask()
    }

    /// Tokens in the stream.
    #[getter]
    fn token_count(&self) -> u64 {
        self.inner.stream().token_count()
    }

    #[getter]
    fn vocab_size(&self) -> u32 {
        self.inner.stream().vocab_size()
    }

    /// Batches already produced and waiting.
    #[getter]
    fn buffered(&self) -> usize {
        self.inner.buffered()
    }

    /// The next batch as a `TokenBatch`; its arrays are fresh int64 `[batch_size, seq_len]`
    /// arrays. Waits without the GIL; Ctrl-C interrupts the wait.
    fn next_batch(&self, py: Python<'_>) -> PyResult<PyTokenBatch> {
        let batch: Batch = loop {
            match py.detach(|| self.inner.next_within(SIGNAL_POLL)) {
                Some(Ok(batch)) => break batch,
                Some(Err(panic)) => {
                    return Err(K2Error::new_err(format!(
                        "internal error in TokenLoader prefetch (a bug in k2, please report it): \
                         {panic}"
                    )))
                }
                None => py.check_signals()?,
            }
        };
        let config = self.inner.config();
        let (rows, cols) = (config.batch_size as usize, config.seq_len as usize);
        let pool = self.inner.pool();
        let loss_mask = if self.inner.stream().has_loss_mask() {
            Some(to_numpy(py, rows, cols, batch.loss_mask, pool)?.unbind())
        } else {
            None
        };
        Ok(PyTokenBatch {
            inputs: to_numpy(py, rows, cols, batch.inputs, pool)?.unbind(),
            targets: to_numpy(py, rows, cols, batch.targets, pool)?.unbind(),
            positions: to_numpy(py, rows, cols, batch.positions, pool)?.unbind(),
            epoch: batch.epoch,
            step: batch.step,
            loss_mask,
        })
    }

    /// The position of the next batch (read-ahead batches do not count) and the facts that a
    /// resuming loader must share, as a dict of ints.
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.state();
        let values = [
            s.epoch,
            s.step,
            s.seed,
            s.seq_len,
            s.global_batch,
            s.num_samples,
            s.fingerprint,
        ];
        let out = PyDict::new(py);
        for (name, value) in STATE_FIELDS.iter().zip(values) {
            out.set_item(name, value)?;
        }
        Ok(out)
    }

    /// Resume from a dict returned by `state()`.
    fn load_state(&self, state: &Bound<'_, PyDict>) -> PyResult<()> {
        let mut v = [0u64; 7];
        for (slot, name) in v.iter_mut().zip(STATE_FIELDS) {
            let item = state.get_item(name)?.ok_or_else(|| {
                DataError::new_err(format!("the loader state lacks the field '{name}'"))
            })?;
            *slot = item.extract().map_err(|_| {
                DataError::new_err(format!(
                    "the loader state field '{name}' is not a non-negative int"
                ))
            })?;
        }
        let saved = LoaderState {
            epoch: v[0],
            step: v[1],
            seed: v[2],
            seq_len: v[3],
            global_batch: v[4],
            num_samples: v[5],
            fingerprint: v[6],
        };
        Ok(self.inner.load_state(&saved)?)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyShardWriter>()?;
    m.add_class::<PyTokenLoader>()?;
    m.add_class::<PyTokenBatch>()?;
    m.add_class::<PyBatchBuffer>()?;
    m.add_function(wrap_pyfunction!(inspect_shard, m)?)?;
    Ok(())
}
