//! The `k2._native` extension module: a thin, boring binding layer over the pure-Rust core.
//!
//! Conventions: inputs are converted first, then the heavy work runs through [`detached`] (GIL
//! released, panics caught, Ctrl-C honoured); errors become the exception classes of
//! `k2.errors`, always naming the file, tensor or worker they are about.

mod broadcast;
mod closable;
mod checkpoint;
mod checksum;
mod data;
mod errors;
mod record;
mod runtime;

use pyo3::prelude::*;

/// k2's native extension (Rust). Use it through the `k2` package.
#[pymodule]
#[pyo3(name = "_native")]
fn native_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    checksum::register(m)?;
    data::register(m)?;
    broadcast::register(m)?;
    checkpoint::register(m)?;
    Ok(())
}
