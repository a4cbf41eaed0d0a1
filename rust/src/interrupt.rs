//! Cooperative cancellation for long native calls.
//!
//! Long work (saving a checkpoint, tokenizing a corpus) runs without the GIL. The binding layer
//! keeps watching for Ctrl-C while it waits and raises the flag of a [`Cancel`] token; the work
//! polls [`Cancel::check`] between units and stops with [`Cancelled`]. Pure-Rust callers that
//! never cancel pass [`Cancel::never`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A shared "please stop" flag.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

/// The error a cancelled piece of work returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled")
    }
}

impl std::error::Error for Cancelled {}

impl Cancel {
    /// A token that is never raised.
    pub fn never() -> Self {
        Self::default()
    }

    /// Ask the work to stop at its next check.
    pub fn raise(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether cancellation was requested.
    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// `Err(Cancelled)` once cancellation was requested.
    pub fn check(&self) -> Result<(), Cancelled> {
        if self.is_raised() {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raised_token_is_seen_by_every_clone() {
        let token = Cancel::never();
        let seen_by_worker = token.clone();
        assert_eq!(seen_by_worker.check(), Ok(()));
        token.raise();
        assert_eq!(seen_by_worker.check(), Err(Cancelled));
    }
}
