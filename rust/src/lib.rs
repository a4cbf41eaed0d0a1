//! k2's native core.
//!
//! The pure-Rust modules know nothing of Python and carry their own unit tests:
//!
//! * [`broadcast`] — the shared-memory weight-broadcast pipeline (trainer to rollout workers);
//! * [`checkpoint`] — crash-safe, checksummed, sharded safetensors checkpoints;
//! * [`checksum`] — the content hash that checkpoint manifests and token shards record;
//! * [`interrupt`] — the cancellation token that long native work polls;
//! * [`data`] — the token pipeline: shard format, packed stream, shuffle, prefetching loader.
//!
//! The PyO3 binding layer lives in `py/` and is compiled only with the `python` feature, which
//! maturin enables when it builds the `k2._native` extension module.

pub mod broadcast;
pub mod checkpoint;
pub mod checksum;
pub mod data;
pub mod interrupt;

#[cfg(feature = "python")]
mod py;
