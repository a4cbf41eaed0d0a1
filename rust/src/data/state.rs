//! A loader's resumable position and the facts that make it meaningful.

/// Where a loader stands, and what it was reading: enough to resume exactly, and to refuse a
/// state from a different dataset or sampling setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderState {
    /// The epoch of the next batch.
    pub epoch: u64,
    /// The step (within the epoch) of the next batch.
    pub step: u64,
    pub seed: u64,
    pub seq_len: u64,
    /// `world_size * batch_size`: a step means the same global batch only if this matches.
    pub global_batch: u64,
    pub num_samples: u64,
    /// [`super::stream::TokenStream::fingerprint`] of the data.
    pub fingerprint: u64,
}

impl LoaderState {
    /// Why `saved` cannot resume a loader whose own state is `self` (`None` if it can).
    pub fn mismatch(&self, saved: &LoaderState) -> Option<String> {
        let fields = [
            ("seed", self.seed, saved.seed),
            ("seq_len", self.seq_len, saved.seq_len),
            (
                "global batch size (world_size * batch_size)",
                self.global_batch,
                saved.global_batch,
            ),
            ("num_samples", self.num_samples, saved.num_samples),
            ("data fingerprint", self.fingerprint, saved.fingerprint),
        ];
        let differing: Vec<String> = fields
            .iter()
            .filter(|(_, mine, theirs)| mine != theirs)
            .map(|(name, mine, theirs)| format!("{name} is {theirs} in the state but {mine} here"))
            .collect();
        if !differing.is_empty() {
            return Some(differing.join("; "));
        }
        let steps = self.num_samples / self.global_batch;
        if saved.step >= steps {
            return Some(format!(
                "step {} is not below the {steps} steps per epoch",
                saved.step
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatch_names_every_differing_field() {
        let mine = LoaderState {
            epoch: 0,
            step: 0,
            seed: 1,
            seq_len: 8,
            global_batch: 4,
            num_samples: 100,
            fingerprint: 7,
        };
        assert_eq!(
            mine.mismatch(&LoaderState {
                epoch: 3,
                step: 24,
                ..mine
            }),
            None
        );
        let msg = mine
            .mismatch(&LoaderState {
                seed: 2,
                fingerprint: 8,
                ..mine
            })
            .unwrap();
        assert!(
            msg.contains("seed is 2") && msg.contains("fingerprint"),
            "{msg}"
        );
        assert!(mine
            .mismatch(&LoaderState { step: 25, ..mine })
            .unwrap()
            .contains("step 25"));
    }
}
