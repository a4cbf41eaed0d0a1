//! Bindings for [`crate::checksum`].

use std::path::PathBuf;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::prelude::*;

use super::errors::io_error;
use super::runtime::detached;
use crate::checksum;

/// XXH3-64 (seed 0) of a bytes-like object (bytes, bytearray, memoryview, a contiguous numpy
/// array). The hash runs without the GIL.
#[pyfunction]
fn xxh3_64(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<u64> {
    let data = PyUntypedBuffer::get(data)?;
    if !data.is_c_contiguous() {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "xxh3_64 needs a C-contiguous buffer",
        ));
    }
    let len = data.len_bytes();
    let ptr = data.buf_ptr() as usize;
    detached(py, "xxh3_64", move |_| {
        // SAFETY: `data` (a buffer view) keeps the exporter's memory alive and unmoved until it is
        // dropped after this call returns; the slice is only read.
        let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        Ok::<_, PyErr>(checksum::xxh3_64(bytes))
    })
}

/// XXH3-64 (seed 0) of a file's contents, streamed without the GIL. Raises
/// `k2.errors.K2IOError` naming the file when it cannot be read.
#[pyfunction]
fn xxh3_64_file(py: Python<'_>, path: PathBuf) -> PyResult<u64> {
    detached(py, "xxh3_64_file", |_| {
        checksum::xxh3_64_file(&path).map_err(|e| io_error("hash", &path, &e))
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(xxh3_64, m)?)?;
    m.add_function(wrap_pyfunction!(xxh3_64_file, m)?)?;
    Ok(())
}
