//! Weight broadcast on one host: the trainer publishes each new weight version to the rollout
//! workers through shared memory (k2's "checkpoint engine", docs/broadcast.md).
//!
//! * [`plan`] — the bucket plan: tensors packed 256-byte aligned into fixed-size buckets, and
//!   each subscriber's copies (its slice of every tensor);
//! * [`segment`] — the shared-memory file: a control block of atomics (round, per-slot tags and
//!   checksums, per-worker state, ack, heartbeat) and the bucket slots: a ring of two, or one
//!   per bucket (a *retained* segment, which keeps the newest version whole);
//! * [`publisher`] / [`subscriber`] — the two ends of the protocol: the publisher stages bucket
//!   `i + 1` while workers copy bucket `i`; every wait is bounded, and a dead or stuck worker is
//!   evicted and named while the others go on;
//! * [`copy`] — parallel copies of many byte ranges (staging, copying into a model);
//! * [`error`] — the error type, whose messages name the worker, bucket or tensor.
//!
//! The module moves bytes only; tensors, dtypes and devices are the Python layer's business.

pub mod copy;
pub mod error;
pub mod plan;
pub mod publisher;
pub mod segment;
pub mod subscriber;
pub mod wait;

pub use copy::{copy_all, CopyJob};
pub use error::{BroadcastError, ErrorKind};
pub use plan::{BucketPlan, Piece, ReceivePlan, TensorSpec, Want};
pub use publisher::{PublishOptions, Publisher, WorkerFailure, WorkerStatus};
pub use subscriber::{announced_plan, RoundInfo, Subscriber};

#[cfg(test)]
mod tests;
