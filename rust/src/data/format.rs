//! The token shard file format: writer and memory-mapped reader.
//!
//! A shard holds a run of tokenized documents, back to back. Its byte layout (all integers
//! little-endian; the full description is in `docs/token-shards.md`):
//!
//! ```text
//! offset  size  field
//!      0     8  magic          b"K2TOKENS"
//!      8     4  version        u32: 1, or 2 when the flags field is in use
//!     12     4  token_bytes    u32, 2 (u16 tokens) or 4 (u32 tokens)
//!     16     4  vocab_size     u32, every token id is below it
//!     20     4  flags          u32 (version 2; zero in version 1): bit 0 = a loss mask follows
//!     24     8  token_count    u64, T
//!     32     8  doc_count      u64, D
//!     40     8  checksum       u64, XXH3-64 (seed 0) of every byte from offset 64 to the end
//!     48    16  reserved       zero
//!     64  T*tb  tokens
//!         pad   zero bytes up to a multiple of 8
//!         8*(D+1) document index: u64 token offsets; document i is tokens [idx[i], idx[i+1]),
//!               idx[0] = 0 and idx[D] = T
//!         T     loss mask (only with flag bit 0): one byte per token, 0 or 1
//!         pad   zero bytes up to a multiple of 8
//! ```
//!
//! A shard without a loss mask is written as version 1, byte for byte what earlier k2 wrote;
//! readers give such a shard an all-ones mask (every token is a training target).
//!
//! The header fields are not covered by the checksum; they are pinned down instead by the file
//! size, which must equal exactly what they promise, and by the document index, whose ends must
//! be 0 and T.

use std::fs::{self, File};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::checksum::Xxh3;
use memmap2::Mmap;

use super::error::{DataError, Result};
use crate::checksum;

/// The first eight bytes of every shard.
pub const MAGIC: &[u8; 8] = b"K2TOKENS";
/// The newest format version this code reads (and writes, for shards with a loss mask).
pub const VERSION: u32 = 2;
/// The version written for shards without a loss mask (identical to what k2 wrote before
/// version 2 existed).
pub const VERSION_PLAIN: u32 = 1;
/// Header flag: a loss-mask section (one byte per token) follows the document index.
pub const FLAG_LOSS_MASK: u32 = 1;
/// Every flag this code knows.
const KNOWN_FLAGS: u32 = FLAG_LOSS_MASK;
/// Size of the fixed header; the tokens start here.
pub const HEADER_BYTES: usize = 64;

/// Bytes per token for a vocabulary: u16 when every id fits, else u32.
pub fn token_bytes_for(vocab_size: u32) -> u32 {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

/// The fixed-size header of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub token_bytes: u32,
    pub vocab_size: u32,
    /// Version 2 only (always 0 in version 1): [`FLAG_LOSS_MASK`].
    pub flags: u32,
    pub token_count: u64,
    pub doc_count: u64,
    pub checksum: u64,
}

impl Header {
    /// Whether a loss-mask section follows the document index.
    pub fn has_loss_mask(&self) -> bool {
        self.flags & FLAG_LOSS_MASK != 0
    }

    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.token_bytes.to_le_bytes());
        b[16..20].copy_from_slice(&self.vocab_size.to_le_bytes());
        b[20..24].copy_from_slice(&self.flags.to_le_bytes());
        b[24..32].copy_from_slice(&self.token_count.to_le_bytes());
        b[32..40].copy_from_slice(&self.doc_count.to_le_bytes());
        b[40..48].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }

    fn decode(path: &Path, b: &[u8]) -> Result<Self> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        if &b[0..8] != MAGIC {
            return Err(DataError::corrupt(
                path,
                format!("wrong magic {:?}", &b[0..8]),
            ));
        }
        let header = Self {
            version: u32_at(8),
            token_bytes: u32_at(12),
            vocab_size: u32_at(16),
            // Version 1 called these bytes reserved: they carry no meaning there.
            flags: if u32_at(8) >= 2 { u32_at(20) } else { 0 },
            token_count: u64_at(24),
            doc_count: u64_at(32),
            checksum: u64_at(40),
        };
        if header.version > VERSION {
            return Err(DataError::corrupt(
                path,
                format!(
                    "format version {} is newer than this k2 reads (up to {VERSION}); upgrade k2",
                    header.version
                ),
            ));
        }
        if header.version == 0 {
            return Err(DataError::corrupt(path, "format version 0 does not exist"));
        }
        if header.flags & !KNOWN_FLAGS != 0 {
            return Err(DataError::corrupt(
                path,
                format!(
                    "unknown header flags {:#x} (this k2 knows {KNOWN_FLAGS:#x}); upgrade k2",
                    header.flags
                ),
            ));
        }
        if header.token_bytes != token_bytes_for(header.vocab_size) {
            return Err(DataError::corrupt(
                path,
                format!(
                    "token_bytes {} does not match vocab_size {}",
                    header.token_bytes, header.vocab_size
                ),
            ));
        }
        Ok(header)
    }

    /// Byte offset of the document index.
    fn index_offset(&self) -> Option<u64> {
        let tokens_end = self
            .token_count
            .checked_mul(self.token_bytes as u64)?
            .checked_add(HEADER_BYTES as u64)?;
        tokens_end.checked_next_multiple_of(8)
    }

    /// Byte offset of the loss-mask section (where the document index ends).
    fn mask_offset(&self) -> Option<u64> {
        self.index_offset()?
            .checked_add(self.doc_count.checked_add(1)?.checked_mul(8)?)
    }

    /// The exact file size this header promises.
    fn file_size(&self) -> Option<u64> {
        let mask_at = self.mask_offset()?;
        if self.has_loss_mask() {
            mask_at.checked_add(self.token_count.checked_next_multiple_of(8)?)
        } else {
            Some(mask_at)
        }
    }
}

/// What a finished shard holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSummary {
    pub token_count: u64,
    pub doc_count: u64,
    pub checksum: u64,
}

/// Writes one shard, document by document, with memory proportional to the document count.
///
/// The bytes go to `PATH.partial`, which [`ShardWriter::finish`] renames to `PATH` once the
/// header is complete and the data is on disk, so a crash never leaves a half shard under the
/// real name.
pub struct ShardWriter {
    path: PathBuf,
    partial: PathBuf,
    out: BufWriter<File>,
    hasher: Xxh3,
    vocab_size: u32,
    token_bytes: u32,
    offsets: Vec<u64>,
    scratch: Vec<u8>,
    /// The loss mask of every token so far, when the shard carries one (it goes after the
    /// document index, so it is held until [`ShardWriter::finish`]: one byte per token).
    mask: Option<Vec<u8>>,
}

impl ShardWriter {
    /// Start a shard at `path` for token ids below `vocab_size`, without a loss mask.
    pub fn create(path: &Path, vocab_size: u32) -> Result<Self> {
        Self::create_with(path, vocab_size, false)
    }

    /// Start a shard at `path`; with `loss_mask`, every document comes with one mask byte per
    /// token ([`ShardWriter::add_masked_document`]) and the shard is written as version 2.
    pub fn create_with(path: &Path, vocab_size: u32, loss_mask: bool) -> Result<Self> {
        if vocab_size == 0 {
            return Err(DataError::invalid(path, "vocab_size must be positive"));
        }
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = File::create(&partial).map_err(|e| DataError::io(&partial, "create", e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; HEADER_BYTES])
            .map_err(|e| DataError::io(&partial, "write", e))?;
        Ok(Self {
            path: path.to_path_buf(),
            partial,
            out,
            hasher: Xxh3::new(),
            vocab_size,
            token_bytes: token_bytes_for(vocab_size),
            offsets: vec![0],
            scratch: Vec::new(),
            mask: loss_mask.then(Vec::new),
        })
    }

    /// Whether this shard carries a loss mask.
    pub fn has_loss_mask(&self) -> bool {
        self.mask.is_some()
    }

    /// Append one document with its loss mask (one byte per token, each 0 or 1: 1 where the
    /// token is a training target). Only for a shard created with a loss mask.
    pub fn add_masked_document(&mut self, tokens: &[u32], mask: &[u8]) -> Result<()> {
        let document = self.offsets.len() - 1;
        let Some(kept) = self.mask.as_mut() else {
            return Err(DataError::invalid(
                &self.path,
                "a loss mask was given, but the shard was created without one",
            ));
        };
        if mask.len() != tokens.len() {
            return Err(DataError::invalid(
                &self.path,
                format!(
                    "document {document}: {} mask bytes for {} tokens",
                    mask.len(),
                    tokens.len()
                ),
            ));
        }
        if let Some(pos) = mask.iter().position(|&m| m > 1) {
            return Err(DataError::invalid(
                &self.path,
                format!(
                    "document {document}: mask byte {} at position {pos} is not 0 or 1",
                    mask[pos]
                ),
            ));
        }
        let before = kept.len();
        kept.extend_from_slice(mask);
        let added = self.add_tokens(tokens);
        if added.is_err() {
            self.mask.as_mut().unwrap().truncate(before);
        }
        added
    }

    /// Append one document. Every id must be below the vocabulary size. For a shard with a loss
    /// mask, use [`ShardWriter::add_masked_document`].
    pub fn add_document(&mut self, tokens: &[u32]) -> Result<()> {
        if self.mask.is_some() {
            return Err(DataError::invalid(
                &self.path,
                format!(
                    "document {}: this shard carries a loss mask; give one per document",
                    self.offsets.len() - 1
                ),
            ));
        }
        self.add_tokens(tokens)
    }

    fn add_tokens(&mut self, tokens: &[u32]) -> Result<()> {
        if let Some(pos) = tokens.iter().position(|&t| t >= self.vocab_size) {
            return Err(DataError::invalid(
                &self.path,
                format!(
                    "token id {} at position {pos} of document {} is outside the vocabulary \
                     (size {})",
                    tokens[pos],
                    self.offsets.len() - 1,
                    self.vocab_size
                ),
            ));
        }
        self.scratch.clear();
        if self.token_bytes == 2 {
            self.scratch
                .extend(tokens.iter().flat_map(|&t| (t as u16).to_le_bytes()));
        } else {
            self.scratch
                .extend(tokens.iter().flat_map(|&t| t.to_le_bytes()));
        }
        let bytes = std::mem::take(&mut self.scratch);
        let written = self.write(&bytes);
        self.scratch = bytes;
        written?;
        let end = self.offsets.last().unwrap() + tokens.len() as u64;
        self.offsets.push(end);
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.out
            .write_all(bytes)
            .map_err(|e| DataError::io(&self.partial, "write", e))
    }

    /// Write the padding, the document index and the header; make the shard durable and give
    /// it its real name.
    pub fn finish(mut self) -> Result<ShardSummary> {
        let token_count = *self.offsets.last().unwrap();
        let tokens_end = HEADER_BYTES as u64 + token_count * self.token_bytes as u64;
        let pad = (tokens_end.next_multiple_of(8) - tokens_end) as usize;
        self.write(&[0u8; 8][..pad])?;
        let index: Vec<u8> = self.offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        self.write(&index)?;
        let flags = if let Some(mask) = self.mask.take() {
            self.write(&mask)?;
            let pad = mask.len().next_multiple_of(8) - mask.len();
            self.write(&[0u8; 8][..pad])?;
            FLAG_LOSS_MASK
        } else {
            0
        };
        let header = Header {
            version: if flags == 0 { VERSION_PLAIN } else { VERSION },
            token_bytes: self.token_bytes,
            vocab_size: self.vocab_size,
            flags,
            token_count,
            doc_count: self.offsets.len() as u64 - 1,
            checksum: self.hasher.digest(),
        };
        let partial = self.partial.clone();
        let io = |e| DataError::io(&partial, "write", e);
        let mut file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&header.encode()).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        fs::rename(&partial, &self.path)
            .map_err(|e| DataError::io(&self.path, "rename into", e))?;
        Ok(ShardSummary {
            token_count,
            doc_count: header.doc_count,
            checksum: header.checksum,
        })
    }
}

/// A memory-mapped, validated shard.
pub struct Shard {
    path: PathBuf,
    header: Header,
    map: Mmap,
    /// The document index, copied out of the file: `doc_offsets[i]` is where document i starts.
    doc_offsets: Vec<u64>,
}

impl Shard {
    /// Map and validate the shard at `path`. With `verify`, the payload checksum is recomputed
    /// (one read of the file at memory speed); the structure is always checked.
    pub fn open(path: &Path, verify: bool) -> Result<Self> {
        let file = File::open(path).map_err(|e| DataError::io(path, "open", e))?;
        let size = file
            .metadata()
            .map_err(|e| DataError::io(path, "stat", e))?
            .len();
        if size < HEADER_BYTES as u64 {
            return Err(DataError::corrupt(
                path,
                format!("truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header"),
            ));
        }
        // SAFETY: the map is read-only and k2 never writes a shard in place (writers go through
        // a `.partial` file and a rename). A process that truncates the file under us could make
        // a later read fault; that is the documented contract of memory-mapped data files.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(path, "map", e))?;
        let header = Header::decode(path, &map[..HEADER_BYTES])?;
        let expected = header
            .file_size()
            .ok_or_else(|| DataError::corrupt(path, "header counts overflow"))?;
        if size < expected {
            return Err(DataError::corrupt(
                path,
                format!(
                    "truncated: {size} bytes, the header promises {expected} ({} tokens, {} \
                     documents)",
                    header.token_count, header.doc_count
                ),
            ));
        }
        if size > expected {
            return Err(DataError::corrupt(
                path,
                format!("{} bytes after the document index", size - expected),
            ));
        }
        if verify {
            let actual = checksum::xxh3_64(&map[HEADER_BYTES..]);
            if actual != header.checksum {
                return Err(DataError::corrupt(
                    path,
                    format!(
                        "checksum mismatch: recorded {:016x}, computed {actual:016x}",
                        header.checksum
                    ),
                ));
            }
        }
        let index_at = header.index_offset().unwrap() as usize;
        let index_end = header.mask_offset().unwrap() as usize;
        let doc_offsets: Vec<u64> = map[index_at..index_end]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let ordered = doc_offsets.windows(2).all(|w| w[0] <= w[1]);
        if doc_offsets[0] != 0 || *doc_offsets.last().unwrap() != header.token_count || !ordered {
            return Err(DataError::corrupt(
                path,
                "the document index is not an ordered run from 0 to the token count",
            ));
        }
        if header.has_loss_mask() {
            let at = header.mask_offset().unwrap() as usize;
            let t = header.token_count as usize;
            let (mask, pad) = map[at..].split_at(t);
            if let Some(pos) = mask.iter().position(|&m| m > 1) {
                return Err(DataError::corrupt(
                    path,
                    format!("loss-mask byte {} of token {pos} is not 0 or 1", mask[pos]),
                ));
            }
            if pad.iter().any(|&b| b != 0) {
                return Err(DataError::corrupt(
                    path,
                    "nonzero padding after the loss mask",
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            header,
            map,
            doc_offsets,
        })
    }

    /// Whether the shard carries a loss mask (else every token counts as a target).
    pub fn has_loss_mask(&self) -> bool {
        self.header.has_loss_mask()
    }

    /// Append the loss mask of tokens `[start, start + count)`, as i64 0/1, to `out`: the
    /// stored bytes, or ones for a shard without a mask.
    ///
    /// Panics if the range runs past the end of the shard (callers index within bounds).
    pub fn extend_mask(&self, start: u64, count: usize, out: &mut Vec<i64>) {
        let start = start as usize;
        assert!(
            start + count <= self.header.token_count as usize,
            "read past the end of {}",
            self.path.display()
        );
        if self.has_loss_mask() {
            let at = self.header.mask_offset().unwrap() as usize + start;
            out.extend(self.map[at..at + count].iter().map(|&m| m as i64));
        } else {
            out.extend(std::iter::repeat_n(1i64, count));
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn token_count(&self) -> u64 {
        self.header.token_count
    }

    /// Start offsets of the documents, plus the token count at the end (`doc_count + 1` values).
    pub fn doc_offsets(&self) -> &[u64] {
        &self.doc_offsets
    }

    /// Append tokens `[start, start + count)`, widened to i64, to `out`.
    ///
    /// Panics if the range runs past the end of the shard (callers index within bounds).
    pub fn extend_tokens(&self, start: u64, count: usize, out: &mut Vec<i64>) {
        let start = start as usize;
        assert!(
            start + count <= self.header.token_count as usize,
            "read past the end of {}",
            self.path.display()
        );
        let tb = self.header.token_bytes as usize;
        let src = &self.map[HEADER_BYTES + tb * start..HEADER_BYTES + tb * (start + count)];
        // Extending from an exact-size iterator writes each element once (no zero-fill first),
        // and the loop vectorizes.
        if tb == 2 {
            out.extend(
                src.chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64),
            );
        } else {
            out.extend(
                src.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64),
            );
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed by the caller's `Drop` guard.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("k2-data-{tag}-{}-{n}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    pub fn write_shard(path: &Path, vocab: u32, docs: &[Vec<u32>]) -> ShardSummary {
        let mut w = ShardWriter::create(path, vocab).unwrap();
        for d in docs {
            w.add_document(d).unwrap();
        }
        w.finish().unwrap()
    }

    fn sample_docs() -> Vec<Vec<u32>> {
        vec![vec![5, 6, 7], vec![], vec![1, 2, 3, 4, 9]]
    }

    fn read_all(shard: &Shard) -> Vec<i64> {
        let mut out = Vec::new();
        shard.extend_tokens(0, shard.token_count() as usize, &mut out);
        out
    }

    #[test]
    fn u16_shard_round_trips_with_the_documented_layout() {
        let dir = TempDir::new("u16");
        let path = dir.0.join("a.k2tok");
        let summary = write_shard(&path, 10, &sample_docs());
        assert_eq!((summary.token_count, summary.doc_count), (8, 3));
        let bytes = fs::read(&path).unwrap();
        // 64 header + 8 tokens * 2 bytes = 80 (already a multiple of 8) + 4 offsets * 8.
        assert_eq!(bytes.len(), 64 + 16 + 32);
        assert_eq!(&bytes[0..8], b"K2TOKENS");
        assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), 2);
        assert_eq!(u16::from_le_bytes([bytes[64], bytes[65]]), 5);
        assert_eq!(u64::from_le_bytes(bytes[96..104].try_into().unwrap()), 3); // idx[2]
        assert_eq!(
            u64::from_le_bytes(bytes[40..48].try_into().unwrap()),
            crate::checksum::xxh3_64(&bytes[64..])
        );
        let shard = Shard::open(&path, true).unwrap();
        assert_eq!(shard.doc_offsets(), &[0, 3, 3, 8]);
        assert_eq!(read_all(&shard), vec![5, 6, 7, 1, 2, 3, 4, 9]);
        assert!(!dir.0.join("a.k2tok.partial").exists());
    }

    #[test]
    fn large_vocab_uses_u32_tokens_and_pads_the_index() {
        let dir = TempDir::new("u32");
        let path = dir.0.join("b.k2tok");
        write_shard(&path, 100_000, &[vec![99_999, 0, 70_000]]);
        let bytes = fs::read(&path).unwrap();
        // 64 + 3 * 4 = 76, padded to 80, then 2 offsets.
        assert_eq!(bytes.len(), 80 + 16);
        let shard = Shard::open(&path, true).unwrap();
        assert_eq!(shard.header().token_bytes, 4);
        assert_eq!(read_all(&shard), vec![99_999, 0, 70_000]);
    }

    #[test]
    fn out_of_vocabulary_token_is_refused() {
        let dir = TempDir::new("oov");
        let mut w = ShardWriter::create(&dir.0.join("c.k2tok"), 10).unwrap();
        let err = w.add_document(&[1, 10]).unwrap_err().to_string();
        assert!(err.contains("token id 10 at position 1"), "{err}");
    }

    fn corrupt_and_open(edit: impl Fn(&mut Vec<u8>)) -> String {
        let dir = TempDir::new("bad");
        let path = dir.0.join("bad.k2tok");
        write_shard(&path, 10, &sample_docs());
        let mut bytes = fs::read(&path).unwrap();
        edit(&mut bytes);
        fs::write(&path, &bytes).unwrap();
        let err = Shard::open(&path, true)
            .err()
            .expect("a corrupt shard must not open");
        let msg = err.to_string();
        assert!(msg.contains("bad.k2tok"), "the error names the file: {msg}");
        msg
    }

    #[test]
    fn corrupt_shards_are_refused_with_the_reason() {
        assert!(corrupt_and_open(|b| b[0] = b'X').contains("wrong magic"));
        assert!(corrupt_and_open(|b| b[8] = 3).contains("newer"));
        assert!(corrupt_and_open(|b| {
            b[8] = 2;
            b[20] = 4;
        })
        .contains("unknown header flags"));
        assert!(corrupt_and_open(|b| b.truncate(b.len() - 1)).contains("truncated"));
        assert!(corrupt_and_open(|b| b.truncate(10)).contains("truncated"));
        assert!(corrupt_and_open(|b| b.push(0)).contains("after the document index"));
        assert!(corrupt_and_open(|b| b[66] ^= 1).contains("checksum mismatch"));
        assert!(corrupt_and_open(|b| b[24] = 9).contains("truncated"));
    }

    #[test]
    fn a_bad_index_is_refused_even_without_verification() {
        let dir = TempDir::new("idx");
        let path = dir.0.join("i.k2tok");
        write_shard(&path, 10, &sample_docs());
        let mut bytes = fs::read(&path).unwrap();
        bytes[88] = 7; // idx[1] = 7 > idx[2] = 3
        fs::write(&path, &bytes).unwrap();
        let msg = Shard::open(&path, false).err().unwrap().to_string();
        assert!(msg.contains("document index"), "{msg}");
    }

    pub fn write_masked_shard(path: &Path, vocab: u32, docs: &[(Vec<u32>, Vec<u8>)]) {
        let mut w = ShardWriter::create_with(path, vocab, true).unwrap();
        for (d, m) in docs {
            w.add_masked_document(d, m).unwrap();
        }
        w.finish().unwrap();
    }

    fn masked_docs() -> Vec<(Vec<u32>, Vec<u8>)> {
        vec![
            (vec![5, 6, 7], vec![0, 1, 1]),
            (vec![], vec![]),
            (vec![1, 2, 3, 4, 9], vec![0, 0, 1, 0, 1]),
        ]
    }

    #[test]
    fn a_masked_shard_is_version_2_with_the_mask_after_the_index() {
        let dir = TempDir::new("mask");
        let path = dir.0.join("m.k2tok");
        write_masked_shard(&path, 10, &masked_docs());
        let bytes = fs::read(&path).unwrap();
        // 64 + 16 tokens bytes, 4 offsets (32), 8 mask bytes (already a multiple of 8).
        assert_eq!(bytes.len(), 64 + 16 + 32 + 8);
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(bytes[20..24].try_into().unwrap()), 1);
        assert_eq!(&bytes[112..120], &[0, 1, 1, 0, 0, 1, 0, 1]);
        assert_eq!(
            u64::from_le_bytes(bytes[40..48].try_into().unwrap()),
            crate::checksum::xxh3_64(&bytes[64..])
        );
        let shard = Shard::open(&path, true).unwrap();
        assert!(shard.has_loss_mask());
        let mut mask = Vec::new();
        shard.extend_mask(2, 4, &mut mask);
        assert_eq!(mask, vec![1, 0, 0, 1]);
        assert_eq!(read_all(&shard), vec![5, 6, 7, 1, 2, 3, 4, 9]);
    }

    #[test]
    fn a_plain_shard_stays_version_1_and_reads_an_all_ones_mask() {
        let dir = TempDir::new("plain");
        let path = dir.0.join("p.k2tok");
        write_shard(&path, 10, &sample_docs());
        let bytes = fs::read(&path).unwrap();
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1);
        let shard = Shard::open(&path, true).unwrap();
        assert!(!shard.has_loss_mask());
        let mut mask = Vec::new();
        shard.extend_mask(1, 5, &mut mask);
        assert_eq!(mask, vec![1; 5]);
    }

    #[test]
    fn a_corrupt_mask_is_refused() {
        let dir = TempDir::new("badmask");
        let path = dir.0.join("bm.k2tok");
        write_masked_shard(&path, 10, &masked_docs());
        let good = fs::read(&path).unwrap();
        // A flipped mask bit passes the structure checks: the checksum catches it.
        let mut bytes = good.clone();
        bytes[112] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let msg = Shard::open(&path, true).err().unwrap().to_string();
        assert!(
            msg.contains("checksum mismatch") && msg.contains("bm.k2tok"),
            "{msg}"
        );
        // A byte that is not 0 or 1 is refused even without verification.
        let mut bytes = good.clone();
        bytes[113] = 7;
        fs::write(&path, &bytes).unwrap();
        let msg = Shard::open(&path, false).err().unwrap().to_string();
        assert!(msg.contains("loss-mask byte 7 of token 1"), "{msg}");
        // A mask cut short is a truncated file.
        fs::write(&path, &good[..good.len() - 8]).unwrap();
        let msg = Shard::open(&path, false).err().unwrap().to_string();
        assert!(msg.contains("truncated"), "{msg}");
    }

    #[test]
    fn masks_must_fit_their_documents_and_the_shard_kind() {
        let dir = TempDir::new("maskargs");
        let mut w = ShardWriter::create_with(&dir.0.join("a.k2tok"), 10, true).unwrap();
        let err = w.add_document(&[1, 2]).unwrap_err().to_string();
        assert!(err.contains("carries a loss mask"), "{err}");
        let err = w
            .add_masked_document(&[1, 2], &[1])
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 mask bytes for 2 tokens"), "{err}");
        let err = w
            .add_masked_document(&[1, 2], &[1, 2])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not 0 or 1"), "{err}");
        let mut plain = ShardWriter::create(&dir.0.join("b.k2tok"), 10).unwrap();
        let err = plain
            .add_masked_document(&[1], &[1])
            .unwrap_err()
            .to_string();
        assert!(err.contains("created without one"), "{err}");
    }

    #[test]
    fn missing_shard_is_an_io_error_naming_it() {
        let err = Shard::open(Path::new("/nonexistent/x.k2tok"), true)
            .err()
            .unwrap();
        assert!(matches!(err, DataError::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/x.k2tok"));
    }
}
