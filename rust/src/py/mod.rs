//! The `k2._native` extension module: a thin, boring binding layer over the pure-Rust core.
//!
//! Conventions: inputs are converted first, then the heavy work runs through
//! [`runtime::detached`] (GIL released, panics caught, Ctrl-C honoured); each core error type
//! becomes the exception classes of `k2.errors` through one `From` conversion (so `?` is all a
//! binding writes), always naming the file, tensor or worker it is about; an object Python can
//! close, finish or commit is reached through [`closable::Closable`] (one lock, one "already
//! closed" error); and a value with named parts crosses the seam as a typed class made with
//! [`record::record!`] (attributes, equality, a readable repr) rather than a positional tuple
//! (the broadcast bindings do; `CheckpointReader.tensors`, `CheckpointWriter.commit` and
//! `TokenLoader.next_batch` still return tuples that their Python wrappers unpack).

mod broadcast;
mod checkpoint;
mod checksum;
mod closable;
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
