//! Crash-safe, checksummed, sharded checkpoints in the safetensors format.
//!
//! A checkpoint is a directory of safetensors shards grouped by file prefix (`model-…`,
//! `optimizer-…`), one Hub-style `GROUP.safetensors.index.json` per group, small JSON files, and
//! a `manifest.json` with the XXH3-64 of every tensor chunk. A checkpoint root holds several
//! checkpoints and a `latest` file naming the newest complete one.
//!
//! * [`writer`] — parallel shard writing into a temporary directory, fsyncs, atomic rename;
//! * [`publish`] — the `latest` pointer, listing and keep-last-K pruning of a checkpoint root;
//! * [`reader`] — memory-mapped reading with per-chunk verification and slice reads;
//! * [`format`](mod@format) — the safetensors header, written through the `safetensors` crate and parsed
//!   defensively; [`manifest`] — the checksum manifest; [`plan`] — shards and file names;
//! * [`trace`] — the recorded order of file-system operations and the fault-injection points
//!   (`K2_CKPT_FAULT=<phase>`) the crash tests use; [`durable`] — the fsync/rename steps.

pub mod durable;
pub mod error;
pub mod format;
pub mod manifest;
pub mod plan;
pub mod publish;
pub mod reader;
pub mod trace;
pub mod writer;

pub use error::{CkptError, Result};
pub use reader::Checkpoint;
pub use writer::{CheckpointWriter, Publish, ShardSpec, TensorRef, WriteOptions};

#[cfg(test)]
mod tests;
