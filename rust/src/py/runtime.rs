//! The one road every long native call takes (after polars' idea): the GIL is released while the
//! work runs on a scoped worker thread; the calling thread wakes every 50 ms to let Python check
//! for signals, and on Ctrl-C raises the work's [`Cancel`] token; a Rust panic becomes a
//! `k2.errors.K2Error` naming the call instead of aborting the interpreter.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::Duration;

use pyo3::prelude::*;

use super::errors::K2Error;
use crate::interrupt::Cancel;

const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Run `work` without the GIL. `what` names the call in error messages.
///
/// `work` gets a [`Cancel`] token to poll; if Ctrl-C arrives, the token is raised, `work` is
/// awaited (it must return soon after) and the `KeyboardInterrupt` is re-raised.
pub fn detached<T, E, F>(py: Python<'_>, what: &str, work: F) -> PyResult<T>
where
    T: Send,
    E: Send,
    F: FnOnce(&Cancel) -> Result<T, E> + Send,
    PyErr: From<E>,
{
    let cancel = Cancel::never();
    let (outcome, interrupt) = py.detach(|| {
        std::thread::scope(|scope| {
            let (tx, rx) = mpsc::channel();
            let token = cancel.clone();
            scope.spawn(move || {
                let result = catch_unwind(AssertUnwindSafe(|| work(&token)));
                let _ = tx.send(result);
            });
            let mut interrupt: Option<PyErr> = None;
            loop {
                match rx.recv_timeout(SIGNAL_POLL) {
                    Ok(result) => return (result, interrupt),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if interrupt.is_none() {
                            if let Err(err) = Python::attach(|py| py.check_signals()) {
                                cancel.raise();
                                interrupt = Some(err);
                            }
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        unreachable!("the worker always sends its result before it ends")
                    }
                }
            }
        })
    });
    if let Some(err) = interrupt {
        return Err(err);
    }
    match outcome {
        Ok(result) => result.map_err(PyErr::from),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".to_string());
            Err(K2Error::new_err(format!(
                "internal error in {what} (a bug in k2, please report it): {msg}"
            )))
        }
    }
}
