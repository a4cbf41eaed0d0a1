//! The broadcast module's error: a kind (for callers that branch on it) and a message that names
//! the worker, bucket, tensor or file at fault.

use std::fmt;

/// What went wrong, broadly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The tensors, bucket size or selection make no valid plan.
    Plan,
    /// The shared-memory file could not be created, opened or mapped.
    Io,
    /// The shared-memory segment is not one this version of k2 wrote.
    Layout,
    /// A bounded wait ran out; the message names whom it waited for.
    Timeout,
    /// The publisher's process is gone or it closed the segment.
    PublisherGone,
    /// The publisher gave up on this worker (it was too slow or looked dead).
    Evicted,
    /// A bucket's bytes do not match the checksum the publisher recorded.
    Checksum,
    /// Another live worker already uses this name, or every worker record is taken.
    Join,
    /// The call does not fit the protocol's state (e.g. a bucket out of order).
    Protocol,
    /// Cancelled (Ctrl-C).
    Cancelled,
}

/// An error of the weight-broadcast pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastError {
    pub kind: ErrorKind,
    pub message: String,
}

pub type Result<T, E = BroadcastError> = std::result::Result<T, E>;

impl BroadcastError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn plan(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Plan, message)
    }

    pub fn layout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Layout, message)
    }

    pub fn protocol(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Protocol, message)
    }
}

impl fmt::Display for BroadcastError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BroadcastError {}

impl From<crate::interrupt::Cancelled> for BroadcastError {
    fn from(_: crate::interrupt::Cancelled) -> Self {
        Self::new(ErrorKind::Cancelled, "cancelled")
    }
}
