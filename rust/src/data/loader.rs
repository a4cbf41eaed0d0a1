//! The token loader: shuffled, rank-sliced, prefetched batches from the packed stream.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::error::{DataError, Result};
use super::pool::BufferPool;
use super::prefetch::{Prefetcher, Produced};
use super::sampler::Plan;
use super::state::LoaderState;
use super::stream::TokenStream;

/// The most memory the buffer pool keeps in spare batches.
const POOL_BYTES: u64 = 256 << 20;

/// How to cut, shuffle, split and prefetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderConfig {
    pub seq_len: u64,
    pub batch_size: u64,
    pub seed: u64,
    pub rank: u64,
    pub world_size: u64,
    /// Batches produced ahead of the consumer.
    pub prefetch: usize,
    /// Background threads producing them.
    pub threads: usize,
}

/// One rank's batch at one step; each array is `batch_size * seq_len` long, row-major
/// `[batch_size, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub inputs: Vec<i64>,
    pub targets: Vec<i64>,
    /// Position of each input token within its document (0 at every document start).
    pub positions: Vec<i64>,
    /// 1 where the target is a training target, 0 where the loss must skip it; empty when no
    /// shard of the stream carries a mask (every target counts: the caller supplies ones).
    pub loss_mask: Vec<i64>,
    pub epoch: u64,
    pub step: u64,
}

/// Build the batch at global step index `index` (`epoch * steps_per_epoch + step`).
fn produce(
    stream: &TokenStream,
    pool: &BufferPool,
    plan: &Plan,
    seq_len: u64,
    index: u64,
) -> Batch {
    let steps = plan.steps_per_epoch();
    let (epoch, step) = (index / steps, index % steps);
    let samples = plan.batch(&plan.order(epoch), step);
    let n = (plan.batch_size * seq_len) as usize;
    let mut inputs = pool.take(n);
    let mut targets = pool.take(n);
    let mut positions = pool.take(n);
    let masked = stream.has_loss_mask();
    let mut loss_mask = if masked { pool.take(n) } else { Vec::new() };
    for sample in samples {
        stream.extend_sample(
            sample,
            seq_len as usize,
            &mut inputs,
            &mut targets,
            &mut positions,
            masked.then_some(&mut loss_mask),
        );
    }
    Batch {
        inputs,
        targets,
        positions,
        loss_mask,
        epoch,
        step,
    }
}

/// A deterministic, resumable, prefetching loader over token shards.
pub struct TokenLoader {
    stream: Arc<TokenStream>,
    pool: Arc<BufferPool>,
    plan: Plan,
    config: LoaderConfig,
    prefetcher: Prefetcher<Batch>,
}

impl TokenLoader {
    /// Open the shards (in this order) and start prefetching from epoch 0, step 0.
    pub fn open(paths: &[PathBuf], config: LoaderConfig, verify: bool) -> Result<Self> {
        let stream = Arc::new(TokenStream::open(paths, verify)?);
        let name = stream.name().to_path_buf();
        let invalid = |reason: String| DataError::invalid(&name, reason);
        if config.seq_len == 0 || config.batch_size == 0 || config.world_size == 0 {
            return Err(invalid(
                "seq_len, batch_size and world_size must be positive".into(),
            ));
        }
        if config.rank >= config.world_size {
            return Err(invalid(format!(
                "rank {} is not below world_size {}",
                config.rank, config.world_size
            )));
        }
        let plan = Plan {
            num_samples: stream.num_samples(config.seq_len),
            batch_size: config.batch_size,
            world_size: config.world_size,
            rank: config.rank,
            seed: config.seed,
        };
        if plan.steps_per_epoch() == 0 {
            return Err(invalid(format!(
                "{} tokens in {} shard(s) make {} samples of seq_len {}, fewer than one global \
                 batch of {} (world_size {} x batch_size {})",
                stream.token_count(),
                paths.len(),
                plan.num_samples,
                config.seq_len,
                plan.global_batch(),
                config.world_size,
                config.batch_size
            )));
        }
        // Enough spare batches for the queue, those in flight and a few the caller holds, but no
        // more than POOL_BYTES of them.
        let arrays = if stream.has_loss_mask() { 4 } else { 3 };
        let batch_bytes = arrays * 8 * config.batch_size * config.seq_len;
        let keep =
            (config.prefetch + config.threads + 4).min((POOL_BYTES / batch_bytes).max(1) as usize);
        let pool = Arc::new(BufferPool::new(arrays as usize * keep));
        let prefetcher = {
            let (stream, pool) = (Arc::clone(&stream), Arc::clone(&pool));
            let seq_len = config.seq_len;
            Prefetcher::new(0, config.prefetch, config.threads, move |index| {
                produce(&stream, &pool, &plan, seq_len, index)
            })
        };
        Ok(Self {
            stream,
            pool,
            plan,
            config,
            prefetcher,
        })
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn stream(&self) -> &TokenStream {
        &self.stream
    }

    /// The pool batch buffers come from; hand them back with [`BufferPool::give`] (or
    /// [`TokenLoader::recycle`]) once nothing reads them any more.
    pub fn pool(&self) -> &Arc<BufferPool> {
        &self.pool
    }

    /// Return a batch's buffers to the pool.
    pub fn recycle(&self, batch: Batch) {
        for buffer in [
            batch.inputs,
            batch.targets,
            batch.positions,
            batch.loss_mask,
        ] {
            if buffer.capacity() == 0 {
                continue; // the empty mask of an unmasked stream
            }
            self.pool.give(buffer);
        }
    }

    /// Steps per epoch (the same on every rank).
    pub fn steps_per_epoch(&self) -> u64 {
        self.plan.steps_per_epoch()
    }

    /// The next batch, waiting at most `timeout`; `None` if it is not ready yet.
    pub fn next_within(&self, timeout: Duration) -> Option<Produced<Batch>> {
        self.prefetcher.next_within(timeout)
    }

    /// The next batch, however long it takes.
    pub fn next_batch(&self) -> Produced<Batch> {
        loop {
            if let Some(batch) = self.next_within(Duration::from_secs(3600)) {
                return batch;
            }
        }
    }

    /// Batches produced ahead and waiting.
    pub fn buffered(&self) -> usize {
        self.prefetcher.buffered()
    }

    /// The position of the next batch the consumer gets (batches read ahead do not count).
    pub fn state(&self) -> LoaderState {
        let index = self.prefetcher.position();
        let steps = self.steps_per_epoch();
        LoaderState {
            epoch: index / steps,
            step: index % steps,
            seed: self.plan.seed,
            seq_len: self.config.seq_len,
            global_batch: self.plan.global_batch(),
            num_samples: self.plan.num_samples,
            fingerprint: self.stream.fingerprint(),
        }
    }

    /// Resume from `saved`: the next batch is the one the loader that saved it would have
    /// returned next.
    pub fn load_state(&self, saved: &LoaderState) -> Result<()> {
        if let Some(reason) = self.state().mismatch(saved) {
            return Err(DataError::invalid(
                self.stream.name(),
                format!("cannot resume from this loader state: {reason}"),
            ));
        }
        let index = saved
            .epoch
            .checked_mul(self.steps_per_epoch())
            .and_then(|i| i.checked_add(saved.step))
            .ok_or_else(|| {
                DataError::invalid(
                    self.stream.name(),
                    format!(
                        "cannot resume from this loader state: epoch {} is out of range",
                        saved.epoch
                    ),
                )
            })?;
        self.prefetcher.seek(index);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::format::tests::{write_shard, TempDir};
    use super::*;

    fn config(batch_size: u64, rank: u64, world_size: u64) -> LoaderConfig {
        LoaderConfig {
            seq_len: 4,
            batch_size,
            seed: 3,
            rank,
            world_size,
            prefetch: 3,
            threads: 2,
        }
    }

    /// 2 shards, 301 tokens: token i has id i % 97 so windows are recognisable.
    fn dataset(dir: &TempDir) -> Vec<PathBuf> {
        let a = dir.0.join("a.k2tok");
        let b = dir.0.join("b.k2tok");
        let ids: Vec<u32> = (0..301).map(|i| i % 97).collect();
        write_shard(&a, 97, &[ids[..50].to_vec(), ids[50..120].to_vec()]);
        write_shard(&b, 97, &[ids[120..].to_vec()]);
        vec![a, b]
    }

    #[test]
    fn batches_are_shifted_windows_of_the_stream() {
        let dir = TempDir::new("loader");
        let loader = TokenLoader::open(&dataset(&dir), config(5, 0, 1), true).unwrap();
        assert_eq!(loader.steps_per_epoch(), 75 / 5); // (301 - 1) / 4 = 75 samples
        let batch = loader.next_batch().unwrap();
        for row in 0..5 {
            let x = &batch.inputs[row * 4..row * 4 + 4];
            let y = &batch.targets[row * 4..row * 4 + 4];
            for j in 0..4 {
                assert_eq!((x[j] + 1) % 97, y[j]);
            }
        }
    }

    #[test]
    fn a_restored_loader_continues_exactly_across_the_epoch_boundary() {
        let dir = TempDir::new("resume");
        let paths = dataset(&dir);
        let original = TokenLoader::open(&paths, config(5, 0, 1), true).unwrap();
        let steps = original.steps_per_epoch();
        for _ in 0..steps - 2 {
            original.next_batch().unwrap();
        }
        let saved = original.state();
        assert_eq!((saved.epoch, saved.step), (0, steps - 2));
        let expected: Vec<Batch> = (0..5).map(|_| original.next_batch().unwrap()).collect();
        assert_eq!(expected[2].epoch, 1);
        let restored = TokenLoader::open(&paths, config(5, 0, 1), true).unwrap();
        restored.next_batch().unwrap();
        restored.load_state(&saved).unwrap();
        let got: Vec<Batch> = (0..5).map(|_| restored.next_batch().unwrap()).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn batches_carry_the_targets_mask_only_for_masked_streams() {
        use super::super::format::tests::write_masked_shard;
        let dir = TempDir::new("loadermask");
        let plain = TokenLoader::open(&dataset(&dir), config(5, 0, 1), true).unwrap();
        assert!(plain.next_batch().unwrap().loss_mask.is_empty());
        // Token i has id i % 97 and mask (i % 3 == 0): the mask of target id y is (y % 3 == 0)
        // as long as ids do not wrap (97 tokens).
        let path = dir.0.join("m.k2tok");
        let ids: Vec<u32> = (0..97).collect();
        let mask: Vec<u8> = (0..97).map(|i| (i % 3 == 0) as u8).collect();
        write_masked_shard(&path, 97, &[(ids, mask)]);
        let masked = TokenLoader::open(&[path], config(4, 0, 1), true).unwrap();
        let batch = masked.next_batch().unwrap();
        assert_eq!(batch.loss_mask.len(), batch.targets.len());
        for (y, m) in batch.targets.iter().zip(&batch.loss_mask) {
            assert_eq!(*m, (y % 3 == 0) as i64, "target {y}");
        }
    }

    #[test]
    fn too_small_a_dataset_and_a_bad_rank_are_refused() {
        let dir = TempDir::new("small");
        let paths = dataset(&dir);
        let msg = TokenLoader::open(&paths, config(40, 0, 2), true)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("fewer than one global batch"), "{msg}");
        let msg = TokenLoader::open(&paths, config(1, 2, 2), true)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("rank 2"), "{msg}");
    }
}
