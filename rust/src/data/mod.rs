//! The token pipeline's native core: shards on disk, and the loader that feeds training.
//!
//! * [`format`] — the token shard file: [`format::ShardWriter`] and the memory-mapped
//!   [`format::Shard`];
//! * [`stream`] — shards read as one packed token stream, cut into fixed-length samples;
//! * [`shuffle`] — the seeded, epoch-dependent permutation of samples;
//! * [`sampler`] — which samples each rank reads at each step (ranks in lockstep);
//! * [`prefetch`] — background threads that produce batches ahead, in order;
//! * [`pool`] — recycled batch buffers, so batches do not cost page faults;
//! * [`state`] — the resumable position of a loader;
//! * [`loader`] — [`loader::TokenLoader`], which puts them together.

pub mod error;
pub mod format;
pub mod loader;
pub mod pool;
pub mod prefetch;
pub mod sampler;
pub mod shuffle;
pub mod state;
pub mod stream;

pub use error::DataError;
pub use format::{Shard, ShardSummary, ShardWriter};
pub use loader::{Batch, LoaderConfig, TokenLoader};
pub use state::LoaderState;
