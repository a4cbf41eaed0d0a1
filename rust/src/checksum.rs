//! Content checksums.
//!
//! k2 uses XXH3-64 (seed 0) wherever it records the hash of a byte range: checkpoint manifests
//! hash each tensor chunk, token shards hash their payload. The implementation is `twox-hash`'s,
//! which picks its AVX2 or SSE2 code at run time, so one portable wheel still hashes at close
//! to memory bandwidth on one core (verifying a checkpoint costs about as much as reading it).

use std::fs::File;
use std::hash::Hasher;
use std::io::{self, Read};
use std::path::Path;

use twox_hash::XxHash3_64;

/// XXH3-64 of `data`.
pub fn xxh3_64(data: &[u8]) -> u64 {
    XxHash3_64::oneshot(data)
}

/// XXH3-64 of bytes fed in pieces: `update` any number of times, then `digest` (equal to
/// [`xxh3_64`] of the concatenation).
#[derive(Default)]
pub struct Xxh3 {
    inner: XxHash3_64,
}

impl Xxh3 {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.write(bytes);
    }

    pub fn digest(&self) -> u64 {
        self.inner.finish()
    }
}

/// XXH3-64 of a whole file, streamed in 1 MiB reads (the result equals [`xxh3_64`] of its bytes).
pub fn xxh3_64_file(path: &Path) -> io::Result<u64> {
    let mut file = File::open(path)?;
    let mut hasher = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.digest())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn empty_input_has_the_published_xxh3_value() {
        // XXH3_64bits("") with seed 0, from the xxHash reference implementation.
        assert_eq!(xxh3_64(b""), 0x2D06_8005_38D3_94C2);
    }

    #[test]
    fn one_changed_byte_changes_the_hash() {
        let mut data = vec![7u8; 4096];
        let before = xxh3_64(&data);
        data[1234] ^= 1;
        assert_ne!(before, xxh3_64(&data));
    }

    #[test]
    fn streamed_file_hash_equals_in_memory_hash() {
        let dir = std::env::temp_dir().join(format!("k2-checksum-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("blob.bin");
        // Larger than one read buffer, and not a multiple of it.
        let data: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i * 31 % 251) as u8).collect();
        File::create(&path).unwrap().write_all(&data).unwrap();
        assert_eq!(xxh3_64_file(&path).unwrap(), xxh3_64(&data));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hashing_in_odd_pieces_equals_hashing_at_once() {
        let data: Vec<u8> = (0..100_003u32).map(|i| (i * 131 % 253) as u8).collect();
        for piece in [1, 7, 64, 240, 1000, 65_537] {
            let mut h = Xxh3::new();
            data.chunks(piece).for_each(|c| h.update(c));
            assert_eq!(h.digest(), xxh3_64(&data), "pieces of {piece} bytes");
        }
    }

    #[test]
    fn missing_file_is_an_error() {
        assert!(xxh3_64_file(Path::new("/nonexistent/k2/blob")).is_err());
    }
}
