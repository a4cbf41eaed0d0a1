//! The one way a binding reaches a native object that Python can close (or finish, or
//! commit): through a lock, refusing with a clear error once the object is gone or after an
//! internal error (a panic) left it in an unknown state.

use std::sync::Mutex;

use pyo3::prelude::*;

use super::errors::K2Error;

/// A native object behind a lock, until it is closed.
pub struct Closable<T> {
    inner: Mutex<Option<T>>,
    /// What the object is, for error messages ("publisher", "the shard writer of PATH").
    what: String,
    /// Why it is gone: "closed", "already finished", "already committed".
    gone: &'static str,
    /// The exception a call on a closed object raises.
    error: fn(String) -> PyErr,
}

impl<T> Closable<T> {
    pub fn new(
        value: T,
        what: impl Into<String>,
        gone: &'static str,
        error: fn(String) -> PyErr,
    ) -> Self {
        Self {
            inner: Mutex::new(Some(value)),
            what: what.into(),
            gone,
            error,
        }
    }

    fn closed(&self) -> PyErr {
        (self.error)(format!("{} is {}", self.what, self.gone))
    }

    fn poisoned(&self) -> PyErr {
        K2Error::new_err(format!(
            "{} is unusable after an internal error (a bug in k2, please report it)",
            self.what
        ))
    }

    /// Run `work` on the object under its lock; its error converts into the matching Python
    /// exception through `From`.
    pub fn with<R, E>(&self, work: impl FnOnce(&mut T) -> Result<R, E>) -> PyResult<R>
    where
        PyErr: From<E>,
    {
        let mut guard = self.inner.lock().map_err(|_| self.poisoned())?;
        let value = guard.as_mut().ok_or_else(|| self.closed())?;
        Ok(work(value)?)
    }

    /// Take the object out for a last, consuming call (finish, commit); later calls fail.
    pub fn take(&self) -> PyResult<T> {
        let mut guard = self.inner.lock().map_err(|_| self.poisoned())?;
        guard.take().ok_or_else(|| self.closed())
    }

    /// Drop the object now (closing it); closing twice, or after an internal error, is fine.
    pub fn close(&self) {
        let value = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(value);
    }
}
