//! Writing a checkpoint: shards in parallel into a temporary directory, then an atomic publish.
//!
//! The order of a save (each step recorded in the [`Trace`], each phase a fault point):
//!
//! 1. create `PARENT/.k2-tmp-NAME/` (a stale one from a crashed save is removed first);
//! 2. write every shard: the bytes of all shards are cut into work units (one chunk, or small
//!    tensors gathered up to [`GATHER_BYTES`]) and written by the rayon pool with `pwrite`,
//!    each chunk hashed as it goes out;
//! 3. fsync every shard (in parallel); write the small JSON files and the group indexes and
//!    fsync them together (in parallel); write and fsync `manifest.json`; fsync the temporary
//!    directory;
//! 4. rename it to `PARENT/NAME` and fsync `PARENT`;
//! 5. when publishing into a checkpoint root: write and fsync `latest.tmp`, rename it over
//!    `latest`, fsync the root, then prune all but the last K checkpoints (each is first renamed
//!    to `.k2-trash-NAME`, so a half-removed checkpoint never looks like a checkpoint); see
//!    [`super::publish`].
//!
//! A crash before step 4 leaves only a hidden temporary directory; a crash after it leaves a
//! complete checkpoint that `latest` may or may not name yet. `latest` only ever names a
//! directory that was complete and durable before it was moved.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::durable;
use super::error::{CkptError, Result};
use super::format::{dtype_name, layout, tensor_bytes, Placed};
use super::manifest::{
    chunk_ranges, hex, FileEntry, Manifest, PiecedTensor, TensorEntry, MANIFEST_FILE,
};
use super::plan::index_file_name;
use super::publish::{move_latest, prune, TMP_PREFIX};
use super::trace::{fault_point, Event, Op, Trace};
use crate::checksum::xxh3_64;
use crate::interrupt::Cancel;

/// Small tensors are gathered into one write of at most this many bytes (per worker thread,
/// the only buffer a save allocates); a larger chunk is written straight from its tensor.
pub const GATHER_BYTES: usize = 1 << 20;

/// A tensor to write: its bytes are borrowed, never copied before they reach the kernel.
#[derive(Debug, Clone)]
pub struct TensorRef<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

/// One shard file and the tensors it holds.
#[derive(Debug, Clone)]
pub struct ShardSpec<'a> {
    pub file_name: String,
    /// The group (file prefix) whose index lists these tensors.
    pub group: String,
    pub tensors: Vec<TensorRef<'a>>,
}

/// How a checkpoint is written.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// Checksum granularity, in bytes (also the size of a parallel write unit).
    pub chunk_bytes: usize,
    /// fsync files and directories (off only to measure serialization into the page cache).
    pub durable: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            chunk_bytes: 4 << 20,
            durable: true,
        }
    }
}

/// What to do once the checkpoint directory is in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publish {
    /// Nothing more (a stand-alone directory, e.g. a Hub export).
    Directory,
    /// Move the parent's `latest` pointer to it, then keep only the last `keep_last`
    /// checkpoints of the parent (all of them if `None`).
    Latest { keep_last: Option<usize> },
}

/// A checkpoint being written. Dropping it without [`CheckpointWriter::commit`] leaves the
/// temporary directory behind; the next save into the same place removes it.
pub struct CheckpointWriter {
    final_dir: PathBuf,
    tmp_dir: PathBuf,
    options: WriteOptions,
    manifest: Manifest,
    /// group -> tensor name -> shard file.
    weight_map: BTreeMap<String, BTreeMap<String, String>>,
    /// group -> bytes of tensor data.
    group_bytes: BTreeMap<String, u64>,
    /// Small files written but not yet fsynced (they are fsynced together at commit).
    unsynced: Vec<PathBuf>,
    /// Writes into another writer's staging directory (a rank of a sharded save): it hands its
    /// [`Part`] to that writer instead of committing.
    joined: bool,
    trace: Trace,
}

/// What a joined writer wrote into the shared staging directory: its shards' manifest entries
/// and index entries, for the committing writer to merge ([`CheckpointWriter::merge_part`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Part {
    pub chunk_bytes: u64,
    pub files: BTreeMap<String, FileEntry>,
    /// group -> tensor name -> shard file.
    pub weight_map: BTreeMap<String, BTreeMap<String, String>>,
    /// group -> bytes of tensor data.
    pub group_bytes: BTreeMap<String, u64>,
}

/// One `pwrite` of a work unit: consecutive pieces of one file.
struct Unit<'a> {
    file: usize,
    offset: u64,
    pieces: Vec<Piece<'a>>,
}

/// Bytes of a unit; tensor chunks carry the (tensor slot, chunk index) their hash belongs to.
struct Piece<'a> {
    data: &'a [u8],
    chunk: Option<(usize, usize)>,
}

thread_local! {
    static GATHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The staging directory of the checkpoint that will become `final_dir` (beside it, hidden),
/// after checking the options and the path.
fn staging_dir(final_dir: &Path, options: WriteOptions) -> Result<PathBuf> {
    if options.chunk_bytes == 0 {
        return Err(CkptError::Invalid("chunk_bytes must be positive".into()));
    }
    let name = final_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            CkptError::Invalid(format!("bad checkpoint path {}", final_dir.display()))
        })?;
    Ok(parent_of(final_dir).join(format!("{TMP_PREFIX}{name}")))
}

impl CheckpointWriter {
    /// Start writing the checkpoint that will become `final_dir` (which must not exist).
    pub fn create(final_dir: &Path, options: WriteOptions) -> Result<Self> {
        let tmp_dir = staging_dir(final_dir, options)?;
        if final_dir.exists() {
            return Err(CkptError::Invalid(format!(
                "{} already exists; a checkpoint is never overwritten",
                final_dir.display()
            )));
        }
        let parent = parent_of(final_dir);
        fs::create_dir_all(&parent).map_err(CkptError::io("create directory", &parent))?;
        let trace = Trace::default();
        if tmp_dir.exists() {
            durable::remove_dir(&tmp_dir, &trace)?;
        }
        fs::create_dir(&tmp_dir).map_err(CkptError::io("create directory", &tmp_dir))?;
        fault_point("tmp_created");
        Ok(Self::fresh(final_dir, tmp_dir, options, false, trace))
    }

    /// Write shards into the staging directory that the committing writer of `final_dir` has
    /// created (another process, e.g. rank 0 of a sharded save, which must have returned from
    /// [`CheckpointWriter::create`] first). The writer never commits: [`CheckpointWriter::into_part`]
    /// hands what it wrote to the committing writer.
    pub fn join(final_dir: &Path, options: WriteOptions) -> Result<Self> {
        let tmp_dir = staging_dir(final_dir, options)?;
        if !tmp_dir.is_dir() {
            return Err(CkptError::Invalid(format!(
                "the staging directory {} does not exist: the committing writer creates it before \
                 other writers join",
                tmp_dir.display()
            )));
        }
        Ok(Self::fresh(
            final_dir,
            tmp_dir,
            options,
            true,
            Trace::default(),
        ))
    }

    /// A writer that has written nothing yet into `tmp_dir`.
    fn fresh(
        final_dir: &Path,
        tmp_dir: PathBuf,
        options: WriteOptions,
        joined: bool,
        trace: Trace,
    ) -> Self {
        CheckpointWriter {
            final_dir: final_dir.to_path_buf(),
            tmp_dir,
            options,
            manifest: Manifest::new(options.chunk_bytes as u64),
            weight_map: BTreeMap::new(),
            group_bytes: BTreeMap::new(),
            unsynced: Vec::new(),
            joined,
            trace,
        }
    }

    /// What this joined writer wrote (its shards are written and, when durable, fsynced).
    pub fn into_part(self) -> Result<Part> {
        if !self.joined {
            return Err(CkptError::Invalid(
                "only a joined writer hands over a part; this one commits".into(),
            ));
        }
        Ok(Part {
            chunk_bytes: self.manifest.chunk_bytes,
            files: self.manifest.files,
            weight_map: self.weight_map,
            group_bytes: self.group_bytes,
        })
    }

    /// Take over the shards a joined writer wrote into this writer's staging directory: they
    /// enter the manifest and the group indexes as if written here. Each file must be in the
    /// staging directory with the size the part gives; no file or tensor may come twice.
    pub fn merge_part(&mut self, part: Part) -> Result<()> {
        if part.chunk_bytes != self.manifest.chunk_bytes {
            return Err(CkptError::Invalid(format!(
                "a part written with chunk_bytes {} cannot join a checkpoint of chunk_bytes {}",
                part.chunk_bytes, self.manifest.chunk_bytes
            )));
        }
        for (file, entry) in &part.files {
            if self.manifest.files.contains_key(file) {
                return Err(CkptError::Invalid(format!("shard {file:?} written twice")));
            }
            let path = self.tmp_dir.join(file);
            let size = fs::metadata(&path)
                .map_err(CkptError::io("stat", &path))?
                .len();
            if size != entry.bytes {
                return Err(CkptError::format(
                    &path,
                    format!("{size} bytes on disk, its writer reported {}", entry.bytes),
                ));
            }
        }
        for (group, map) in &part.weight_map {
            let known = self.weight_map.get(group);
            for (tensor, file) in map {
                if known.is_some_and(|m| m.contains_key(tensor)) {
                    return Err(CkptError::Invalid(format!(
                        "tensor {tensor:?} appears twice in group {group:?} (again in {file})"
                    )));
                }
            }
        }
        self.manifest.files.extend(part.files);
        for (group, map) in part.weight_map {
            self.weight_map.entry(group).or_default().extend(map);
        }
        for (group, bytes) in part.group_bytes {
            *self.group_bytes.entry(group).or_default() += bytes;
        }
        Ok(())
    }

    /// Record a tensor stored in row pieces (checked against the shards at commit).
    pub fn add_pieces(&mut self, name: &str, pieced: PiecedTensor) -> Result<()> {
        if self.manifest.pieces.contains_key(name) {
            return Err(CkptError::Invalid(format!(
                "the pieces of tensor {name:?} are recorded twice"
            )));
        }
        self.manifest.pieces.insert(name.to_string(), pieced);
        Ok(())
    }

    /// The temporary directory the files go to until [`CheckpointWriter::commit`].
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp_dir
    }

    /// Write shards, all of them in parallel; each file is fsynced before this returns
    /// (when durable). Tensor names must be unique within a group.
    pub fn write_shards(&mut self, shards: &[ShardSpec<'_>], cancel: &Cancel) -> Result<()> {
        self.check_names(shards)?;
        let laid: Vec<LaidOut> = shards
            .iter()
            .map(|shard| LaidOut::new(shard, &self.tmp_dir))
            .collect::<Result<_>>()?;
        let (units, slots) = cut_units(shards, &laid, self.options.chunk_bytes);

        // Hash and write every unit in parallel.
        let done = AtomicUsize::new(0);
        let half = units.len().div_ceil(2);
        let hashed: Vec<Vec<(usize, usize, u64)>> = units
            .par_iter()
            .map(|unit| {
                cancel.check()?;
                let hashes = unit
                    .pieces
                    .iter()
                    .filter_map(|p| p.chunk.map(|(slot, c)| (slot, c, xxh3_64(p.data))))
                    .collect();
                let shard = &laid[unit.file];
                write_unit(&shard.file, unit, &shard.path)?;
                if done.fetch_add(1, Ordering::SeqCst) + 1 == half {
                    fault_point("mid_write");
                }
                Ok(hashes)
            })
            .collect::<Result<_>>()?;
        for shard in &laid {
            self.trace.record(Op::Write, &shard.path);
        }
        fault_point("shards_written");
        if self.options.durable {
            laid.par_iter()
                .try_for_each(|s| durable::fsync_file(&s.file, &s.path, &self.trace))?;
        }
        fault_point("shards_synced");

        let mut chunk_hashes: Vec<Vec<String>> = slots.iter().map(|_| Vec::new()).collect();
        for (slot, c, hash) in hashed.into_iter().flatten() {
            let list = &mut chunk_hashes[slot];
            list.resize(list.len().max(c + 1), String::new());
            list[c] = hex(hash);
        }
        for (&(f, position), chunks) in slots.iter().zip(chunk_hashes) {
            self.record_tensor(&shards[f], &laid[f], position, chunks);
        }
        for (shard, laid) in shards.iter().zip(&laid) {
            let entry = self
                .manifest
                .files
                .entry(shard.file_name.clone())
                .or_default();
            entry.bytes = laid.header.len() as u64 + laid.placed.last().map_or(0, |p| p.end as u64);
            entry.xxh3 = hex(xxh3_64(&laid.header));
        }
        Ok(())
    }

    /// Enter tensor `laid.placed[position]` of `shard` in the manifest and its group's index.
    fn record_tensor(
        &mut self,
        shard: &ShardSpec<'_>,
        laid: &LaidOut,
        position: usize,
        chunks: Vec<String>,
    ) {
        let placed = &laid.placed[position];
        let t = &shard.tensors[placed.index];
        let entry = self
            .manifest
            .files
            .entry(shard.file_name.clone())
            .or_default();
        entry.tensors.insert(
            t.name.clone(),
            TensorEntry {
                dtype: dtype_name(t.dtype),
                shape: t.shape.clone(),
                offset: (laid.header.len() + placed.start) as u64,
                bytes: t.data.len() as u64,
                chunks,
            },
        );
        self.weight_map
            .entry(shard.group.clone())
            .or_default()
            .insert(t.name.clone(), shard.file_name.clone());
        *self.group_bytes.entry(shard.group.clone()).or_default() += t.data.len() as u64;
    }

    /// Write a small non-tensor file (JSON) into the checkpoint; it is fsynced at commit, together
    /// with the others, so their fsyncs share journal commits.
    pub fn write_file(&mut self, file_name: &str, bytes: &[u8]) -> Result<()> {
        if self.joined {
            return Err(CkptError::Invalid(format!(
                "file {file_name:?}: a joined writer writes shards only; the committing writer \
                 writes the other files"
            )));
        }
        if self.manifest.files.contains_key(file_name) || file_name == MANIFEST_FILE {
            return Err(CkptError::Invalid(format!(
                "file {file_name:?} written twice"
            )));
        }
        let path = self.tmp_dir.join(file_name);
        durable::write_file(&path, bytes, false, &self.trace)?;
        self.unsynced.push(path);
        self.manifest.files.insert(
            file_name.to_string(),
            FileEntry {
                bytes: bytes.len() as u64,
                xxh3: hex(xxh3_64(bytes)),
                tensors: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Finish: write the group indexes and the manifest, make everything durable, rename the
    /// directory into place and publish it. Returns the recorded file-system operations.
    pub fn commit(mut self, publish: Publish) -> Result<Vec<Event>> {
        if self.joined {
            return Err(CkptError::Invalid(
                "a joined writer does not commit: hand its part to the committing writer".into(),
            ));
        }
        let durable = self.options.durable;
        self.manifest
            .check_pieces(&self.tmp_dir.join(MANIFEST_FILE))?;
        for (group, map) in std::mem::take(&mut self.weight_map) {
            let index = serde_json::json!({
                "metadata": {"total_size": self.group_bytes.get(&group).copied().unwrap_or(0)},
                "weight_map": map,
            });
            let bytes = serde_json::to_vec_pretty(&index).expect("an index serializes");
            self.write_file(&index_file_name(&group), &bytes)?;
        }
        if durable {
            self.unsynced.par_iter().try_for_each(|path| {
                let file = File::open(path).map_err(CkptError::io("open", path))?;
                durable::fsync_file(&file, path, &self.trace)
            })?;
        }
        let manifest_path = self.tmp_dir.join(MANIFEST_FILE);
        durable::write_file(
            &manifest_path,
            &self.manifest.to_json(),
            durable,
            &self.trace,
        )?;
        fault_point("manifest_written");
        if durable {
            durable::fsync_dir(&self.tmp_dir, &self.trace)?;
        }
        fault_point("before_rename");
        durable::rename(&self.tmp_dir, &self.final_dir, &self.trace)?;
        fault_point("after_rename");
        let root = parent_of(&self.final_dir);
        if durable {
            durable::fsync_dir(&root, &self.trace)?;
        }
        if let Publish::Latest { keep_last } = publish {
            let name = self
                .final_dir
                .file_name()
                .and_then(|n| n.to_str())
                .expect("checked in create");
            move_latest(&root, name, durable, &self.trace)?;
            fault_point("after_latest");
            if let Some(keep) = keep_last {
                prune(&root, keep, durable, &self.trace)?;
            }
        }
        Ok(self.trace.take())
    }

    fn check_names(&self, shards: &[ShardSpec<'_>]) -> Result<()> {
        let mut seen: HashSet<(&str, &str)> = HashSet::new();
        let mut files: HashSet<&str> = HashSet::new();
        for shard in shards {
            if !files.insert(&shard.file_name) || self.manifest.files.contains_key(&shard.file_name)
            {
                return Err(CkptError::Invalid(format!(
                    "shard {:?} written twice",
                    shard.file_name
                )));
            }
            for t in &shard.tensors {
                let known = self
                    .weight_map
                    .get(&shard.group)
                    .is_some_and(|m| m.contains_key(&t.name));
                if known || !seen.insert((&shard.group, &t.name)) {
                    return Err(CkptError::Invalid(format!(
                        "tensor {:?} appears twice in group {:?}",
                        t.name, shard.group
                    )));
                }
                tensor_bytes(&t.name, t.dtype, &t.shape)?;
            }
        }
        Ok(())
    }
}

/// A shard laid out and its (empty) file created.
struct LaidOut {
    header: Vec<u8>,
    /// Tensor placements in file order.
    placed: Vec<Placed>,
    path: PathBuf,
    file: File,
}

impl LaidOut {
    fn new(shard: &ShardSpec<'_>, dir: &Path) -> Result<Self> {
        let described: Vec<(&str, Dtype, &[usize])> = shard
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice()))
            .collect();
        let (header, placed) = layout(&described)?;
        for p in &placed {
            let t = &shard.tensors[p.index];
            if t.data.len() != p.end - p.start {
                return Err(CkptError::Invalid(format!(
                    "tensor {:?}: {} bytes given, its dtype and shape need {}",
                    t.name,
                    t.data.len(),
                    p.end - p.start
                )));
            }
        }
        let path = dir.join(&shard.file_name);
        let file = File::create(&path).map_err(CkptError::io("create", &path))?;
        // Sized up front: the parallel writes then land inside the file instead of each
        // extending it (cheaper for the file system, and what the safetensors crate does too).
        let size = header.len() + placed.last().map_or(0, |p| p.end);
        file.set_len(size as u64)
            .map_err(CkptError::io("size", &path))?;
        Ok(LaidOut {
            header,
            placed,
            path,
            file,
        })
    }
}

/// Cut every shard's bytes (header, then tensors in file order) into write units: a chunk of a
/// large tensor alone, or small pieces gathered up to [`GATHER_BYTES`].
///
/// Returns the units and, for every tensor, its (shard, position in `placed`) — the "slot" its
/// chunk hashes are filed under.
fn cut_units<'a>(
    shards: &[ShardSpec<'a>],
    laid: &'a [LaidOut],
    chunk_bytes: usize,
) -> (Vec<Unit<'a>>, Vec<(usize, usize)>) {
    let unit_limit = chunk_bytes.min(GATHER_BYTES);
    let mut units = Vec::new();
    let mut slots = Vec::new();
    for (f, (shard, laid)) in shards.iter().zip(laid).enumerate() {
        let header = Piece {
            data: &laid.header[..],
            chunk: None,
        };
        let mut unit = Unit {
            file: f,
            offset: 0,
            pieces: vec![header],
        };
        let mut unit_len = laid.header.len();
        for (position, p) in laid.placed.iter().enumerate() {
            let slot = slots.len();
            slots.push((f, position));
            let data = shard.tensors[p.index].data;
            for (c, (s, e)) in chunk_ranges(data.len() as u64, chunk_bytes as u64).enumerate() {
                let piece = &data[s as usize..e as usize];
                if unit_len > 0 && unit_len + piece.len() > unit_limit {
                    let offset = unit.offset + unit_len as u64;
                    let next = Unit {
                        file: f,
                        offset,
                        pieces: Vec::new(),
                    };
                    units.push(std::mem::replace(&mut unit, next));
                    unit_len = 0;
                }
                unit.pieces.push(Piece {
                    data: piece,
                    chunk: Some((slot, c)),
                });
                unit_len += piece.len();
            }
        }
        units.push(unit);
    }
    (units, slots)
}

fn write_unit(file: &File, unit: &Unit<'_>, path: &Path) -> Result<()> {
    if let [single] = unit.pieces.as_slice() {
        return file
            .write_all_at(single.data, unit.offset)
            .map_err(CkptError::io("write", path));
    }
    GATHER.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.clear();
        for p in &unit.pieces {
            buf.extend_from_slice(p.data);
        }
        file.write_all_at(&buf, unit.offset)
            .map_err(CkptError::io("write", path))
    })
}

fn parent_of(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
