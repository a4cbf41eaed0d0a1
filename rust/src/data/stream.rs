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
            return Err(DataError::invalid(
                &PathBuf::from("<no shards>"),
                "no shards to read",
            ));
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
        Ok(Self {
            shards,
            shard_starts,
            doc_starts,
        })
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

    /// Append stream tokens `[start, start + count)`, widened to i64, to `out` (across shards).
    pub fn extend_tokens(&self, start: u64, count: usize, out: &mut Vec<i64>) {
        let end = start + count as u64;
        let mut at = start;
        // The shard that holds `start`: the last one that starts at or before it.
        let mut k = self.shard_starts.partition_point(|&s| s <= at) - 1;
        while at < end {
            let n = self.shard_starts[k + 1].min(end) - at;
            self.shards[k].extend_tokens(at - self.shard_starts[k], n as usize, out);
            at += n;
            k += 1;
        }
    }

    /// Append the position ids of stream tokens `[start, start + count)` to `out`: each
    /// token's distance from the start of its document.
    pub fn extend_positions(&self, start: u64, count: usize, out: &mut Vec<i64>) {
        let end = start + count as u64;
        // The first document that starts after `start`, and the one `start` is in.
        let mut next = self.doc_starts.partition_point(|&d| d <= start);
        let mut doc_start = if next == 0 {
            0
        } else {
            self.doc_starts[next - 1]
        };
        let mut at = start;
        while at < end {
            let run_end = self.doc_starts.get(next).map_or(end, |&d| d.min(end));
            let first = (at - doc_start) as i64;
            out.extend(first..first + (run_end - at) as i64);
            at = run_end;
            if at < end {
                doc_start = self.doc_starts[next];
                next += 1;
            }
        }
    }

    /// Whether any shard carries a loss mask.
    pub fn has_loss_mask(&self) -> bool {
        self.shards.iter().any(Shard::has_loss_mask)
    }

    /// Append the loss mask of stream tokens `[start, start + count)` to `out` (ones where a
    /// shard has no mask).
    pub fn extend_mask(&self, start: u64, count: usize, out: &mut Vec<i64>) {
        let end = start + count as u64;
        let mut at = start;
        let mut k = self.shard_starts.partition_point(|&s| s <= at) - 1;
        while at < end {
            let n = self.shard_starts[k + 1].min(end) - at;
            self.shards[k].extend_mask(at - self.shard_starts[k], n as usize, out);
            at += n;
            k += 1;
        }
    }

    /// Append one sample's inputs, targets, position ids and, if asked, loss mask (`seq_len`
    /// values each). The mask is the targets' mask: 1 where the target token is a training
    /// target.
    pub fn extend_sample(
        &self,
        sample: u64,
        seq_len: usize,
        inputs: &mut Vec<i64>,
        targets: &mut Vec<i64>,
        positions: &mut Vec<i64>,
        loss_mask: Option<&mut Vec<i64>>,
    ) {
        let start = sample * seq_len as u64;
        assert!(
            start + (seq_len as u64) < self.token_count(),
            "sample {sample} is past the end"
        );
        self.extend_tokens(start, seq_len, inputs);
        self.extend_tokens(start + 1, seq_len, targets);
        self.extend_positions(start, seq_len, positions);
        if let Some(mask) = loss_mask {
            self.extend_mask(start + 1, seq_len, mask);
        }
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
        let sample = |i| {
            let (mut x, mut y, mut p, mut m) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            s.extend_sample(i, 3, &mut x, &mut y, &mut p, Some(&mut m));
            assert_eq!(m, vec![1; 3], "shards without a mask read as all ones");
            (x, y, p)
        };
        assert_eq!(
            sample(1),
            (vec![13, 14, 15], vec![14, 15, 16], vec![0, 1, 0])
        );
        assert_eq!(
            sample(2),
            (vec![16, 17, 18], vec![17, 18, 19], vec![0, 1, 2])
        );
        for start in 0..10 {
            let mut all = Vec::new();
            s.extend_positions(start, 10 - start as usize, &mut all);
            assert_eq!(
                all,
                [0, 1, 2, 0, 1, 0, 0, 1, 2, 3][start as usize..],
                "from {start}"
            );
        }
    }

    #[test]
    fn the_mask_follows_the_targets_across_masked_and_plain_shards() {
        use super::super::format::tests::write_masked_shard;
        let dir = TempDir::new("streammask");
        let a = dir.0.join("a.k2tok");
        let b = dir.0.join("b.k2tok");
        write_masked_shard(
            &a,
            32,
            &[
                (vec![10, 11, 12], vec![0, 1, 0]),
                (vec![13, 14], vec![1, 1]),
            ],
        );
        write_shard(&b, 32, &[vec![15, 16]]);
        let s = TokenStream::open(&[a, b], true).unwrap();
        assert!(s.has_loss_mask());
        let (mut x, mut y, mut p, mut m) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        s.extend_sample(1, 3, &mut x, &mut y, &mut p, Some(&mut m));
        // inputs 13 14 15, targets 14 15 16: the masks of stream tokens 4, 5, 6.
        assert_eq!((y, m), (vec![14, 15, 16], vec![1, 1, 1]));
        let (mut x, mut y, mut p, mut m) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        s.extend_sample(0, 3, &mut x, &mut y, &mut p, Some(&mut m));
        assert_eq!((y, m), (vec![11, 12, 13], vec![1, 0, 1]));
    }

    #[test]
    fn shards_with_different_vocabularies_are_refused() {
        let dir = TempDir::new("vocab");
        let a = dir.0.join("a.k2tok");
        let b = dir.0.join("b.k2tok");
        write_shard(&a, 32, &[vec![1, 2]]);
        write_shard(&b, 64, &[vec![1, 2]]);
        let msg = TokenStream::open(&[a, b], true).err().unwrap().to_string();
        assert!(
            msg.contains("b.k2tok") && msg.contains("vocabulary size 64"),
            "{msg}"
        );
    }
}
