//! The packed token stream: several shards read as one sequence, cut into fixed-length samples.
//!
//! Sample `i` (of length `seq_len`) covers stream tokens `[i*seq_len, i*seq_len + seq_len]`:
//! its inputs are the first `seq_len` of them and its targets the last `seq_len` (the inputs
//! shifted by one). Consecutive samples share one boundary token, so a stream of `T` tokens
//! holds `(T - 1) / seq_len` samples; a sample may span documents and shards. Each input
//! token's position id counts from 0 at the start of its document.

use std::path::PathBuf;

use super::error::{DataError, Result};
use super::format::Shard;
use crate::checksum;

/// Shards concatenated in the order given.
pub struct TokenStream {
    shards: Vec<Shard>,
    /// `shard_starts[k]` is the stream offset of shard k's first token; one extra entry holds
    /// the stream length.
    shard_starts: Vec<u64>,
    /// Stream offsets where documents start, sorted (empty documents repeat an offset).
    doc_starts: Vec<u64>,
}

impl TokenStream {
    /// Open and validate every shard (checksums too with `verify`). The shards must share one
    /// vocabulary.
    pub fn open(paths: &[PathBuf], verify: bool) -> Result<Self> {
        let Some(first) = paths.first() else {
            return Err(DataError::invalid(&PathBuf::from("<no shards>"), "no shards to read"));
        };
        let mut shards = Vec::with_capacity(paths.len());
        let mut shard_starts = vec![0u64];
        let mut doc_starts = Vec::new();
        for path in paths {
            let shard = Shard::open(path, verify)?;
            let start = *shard_starts.last().unwrap();
            let offsets = shard.doc_offsets();
            doc_starts.extend(offsets[..offsets.len() - 1].iter().map(|o| start + o));
            shard_starts.push(start + shard.token_count());
            shards.push(shard);
        }
        let vocab = shards[0].header().vocab_size;
        if let Some(other) = shards.iter().find(|s| s.header().vocab_size != vocab) {
            return Err(DataError::invalid(
                other.path(),
                format!(
                    "vocabulary size {} differs from {} of {}",
                    other.header().vocab_size,
                    vocab,
                    first.display()
                ),
            ));
        }
        Ok(Self { shards, shard_starts, doc_starts })
    }

    pub fn token_count(&self) -> u64 {
        *self.shard_starts.last().unwrap()
    }

    pub fn vocab_size(&self) -> u32 {
        self.shards[0].header().vocab_size
    }

    /// The path of the first shard, to name the dataset in messages.
    pub fn name(&self) -> &std::path::Path {
        self.shards[0].path()
    }

    /// How many samples of `seq_len` tokens the stream holds.
    pub fn num_samples(&self, seq_len: u64) -> u64 {
        self.token_count().saturating_sub(1) / seq_len
    }

    /// A hash that identifies the stream's content (the shards' checksums and sizes, in order).
    pub fn fingerprint(&self) -> u64 {
        let mut bytes = Vec::with_capacity(self.shards.len() * 16);
        for s in &self.shards {
            bytes.extend(s.header().checksum.to_le_bytes());
            bytes.extend(s.token_count().to_le_bytes());
        }
        checksum::xxh3_64(&bytes)
    }

    /// Widen stream tokens `[start, start + out.len())` into `out`, across shards.
    pub fn read_into(&self, start: u64, out: &mut [i64]) {
        let mut at = start;
        let mut filled = 0;
        // The shard that holds `start`: the last one that starts at or before it.
        let mut k = self.shard_starts.partition_point(|&s| s <= at) - 1;
        while filled < out.len() {
            let shard_end = self.shard_starts[k + 1];
            let n = ((shard_end - at) as usize).min(out.len() - filled);
            self.shards[k].read_into(at - self.shard_starts[k], &mut out[filled..filled + n]);
            filled += n;
            at += n as u64;
            k += 1;
        }
    }

    /// Position ids of stream tokens `[start, start + out.len())`: the distance of each token
    /// from the start of its document.
    pub fn positions_into(&self, start: u64, out: &mut [i64]) {
        // Index of the first document start after `start`.
        let mut next = self.doc_starts.partition_point(|&d| d <= start);
        let mut doc_start = if next == 0 { 0 } else { self.doc_starts[next - 1] };
        for (i, p) in out.iter_mut().enumerate() {
            let t = start + i as u64;
            while next < self.doc_starts.len() && self.doc_starts[next] <= t {
                doc_start = self.doc_starts[next];
                next += 1;
            }
            *p = (t - doc_start) as i64;
        }
    }

    /// Fill one sample's inputs, targets and position ids (each `seq_len` long).
    pub fn sample_into(
        &self,
        sample: u64,
        inputs: &mut [i64],
        targets: &mut [i64],
        positions: &mut [i64],
    ) {
        let seq_len = inputs.len() as u64;
        let start = sample * seq_len;
        assert!(start + seq_len < self.token_count(), "sample {sample} is past the end");
        self.read_into(start, inputs);
        self.read_into(start + 1, targets);
        self.positions_into(start, positions);
    }
}

#[cfg(test)]
mod tests {
    use super::super::format::tests::{write_shard, TempDir};
    use super::*;

    /// Two shards: documents [10 11 12] [13 14] | [15] [16 17 18 19], vocab 32.
    fn two_shards(dir: &TempDir) -> TokenStream {
        let a = dir.0.join("a.k2tok");
        let b = dir.0.join("b.k2tok");
        write_shard(&a, 32, &[vec![10, 11, 12], vec![13, 14]]);
        write_shard(&b, 32, &[vec![15], vec![16, 17, 18, 19]]);
        TokenStream::open(&[a, b], true).unwrap()
    }

    #[test]
    fn samples_span_shards_with_shifted_targets_and_document_positions() {
        let dir = TempDir::new("stream");
        let s = two_shards(&dir);
        assert_eq!(s.token_count(), 10);
        assert_eq!(s.num_samples(3), 3); // (10 - 1) / 3
        let (mut x, mut y, mut p) = ([0i64; 3], [0i64; 3], [0i64; 3]);
        s.sample_into(1, &mut x, &mut y, &mut p);
        assert_eq!(x, [13, 14, 15]);
        assert_eq!(y, [14, 15, 16]);
        assert_eq!(p, [0, 1, 0]);
        s.sample_into(2, &mut x, &mut y, &mut p);
        assert_eq!(x, [16, 17, 18]);
        assert_eq!(y, [17, 18, 19]);
        assert_eq!(p, [0, 1, 2]);
        let mut all = [0i64; 10];
        s.positions_into(0, &mut all);
        assert_eq!(all, [0, 1, 2, 0, 1, 0, 0, 1, 2, 3]);
    }

    #[test]
    fn shards_with_different_vocabularies_are_refused() {
        let dir = TempDir::new("vocab");
        let a = dir.0.join("a.k2tok");
        let b = dir.0.join("b.k2tok");
        write_shard(&a, 32, &[vec![1, 2]]);
        write_shard(&b, 64, &[vec![1, 2]]);
        let msg = TokenStream::open(&[a, b], true).err().unwrap().to_string();
        assert!(msg.contains("b.k2tok") && msg.contains("vocabulary size 64"), "{msg}");
    }
}
