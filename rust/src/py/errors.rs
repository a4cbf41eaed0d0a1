//! The Python exception classes that native errors become. They are defined in `k2/errors.py`
//! (so they can also derive from `OSError` or `ValueError`) and imported here on first use.

use pyo3::import_exception;
use pyo3::PyErr;

import_exception!(k2.errors, K2Error);
import_exception!(k2.errors, K2IOError);
import_exception!(k2.errors, CheckpointError);

/// An I/O error about `path`, as `k2.errors.K2IOError` (an `OSError`).
pub fn io_error(action: &str, path: &std::path::Path, err: &std::io::Error) -> PyErr {
    K2IOError::new_err(format!("cannot {action} {}: {err}", path.display()))
}
