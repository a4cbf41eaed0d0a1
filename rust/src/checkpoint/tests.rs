//! Write-then-read tests of the whole module, on small checkpoints in a temporary directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use safetensors::{Dtype, SafeTensors};

use super::publish::{list_checkpoints, read_latest};
use super::trace::{Event, Op};
use super::*;
use crate::interrupt::Cancel;

/// A fresh, empty directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("k2-ckpt-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const SMALL_CHUNK: WriteOptions = WriteOptions {
    chunk_bytes: 64,
    durable: true,
};

/// Save tensors `(name, dtype, shape, bytes)` as one group cut into shards of `max_shard` bytes.
fn save(
    dir: &Path,
    tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
    max_shard: usize,
    publish: Publish,
) -> Vec<Event> {
    let refs: Vec<TensorRef<'_>> = tensors
        .iter()
        .map(|(n, d, s, b)| TensorRef {
            name: n.to_string(),
            dtype: *d,
            shape: s.clone(),
            data: b,
        })
        .collect();
    let plan = plan::plan_shards(
        &refs.iter().map(|t| t.data.len()).collect::<Vec<_>>(),
        max_shard,
    );
    let shards: Vec<ShardSpec<'_>> = plan
        .iter()
        .enumerate()
        .map(|(i, idx)| ShardSpec {
            file_name: plan::shard_file_name("model", i, plan.len()),
            group: "model".into(),
            tensors: idx.iter().map(|&j| refs[j].clone()).collect(),
        })
        .collect();
    let mut writer = CheckpointWriter::create(dir, SMALL_CHUNK).unwrap();
    writer.write_shards(&shards, &Cancel::never()).unwrap();
    writer
        .write_file("train_state.json", br#"{"step": 3}"#)
        .unwrap();
    writer.commit(publish).unwrap()
}

fn sample() -> Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)> {
    vec![
        ("embed", Dtype::BF16, vec![40, 8], pattern(640, 1)),
        ("norm", Dtype::F32, vec![8], pattern(32, 2)),
        ("experts", Dtype::F32, vec![4, 10, 3], pattern(480, 3)),
        ("scalar", Dtype::I64, vec![], pattern(8, 4)),
        ("empty", Dtype::F32, vec![0, 5], Vec::new()),
    ]
}

#[test]
fn tensors_come_back_byte_for_byte_whatever_the_shard_count() {
    for max_shard in [100, 1 << 20] {
        let root = TempDir::new();
        let dir = root.0.join("step-1");
        save(&dir, &sample(), max_shard, Publish::Directory);
        let ckpt = Checkpoint::open(&dir).unwrap();
        ckpt.verify_all(&Cancel::never()).unwrap();
        for (name, dtype, shape, bytes) in sample() {
            let info = ckpt.info(name).unwrap();
            assert_eq!((info.dtype, &info.shape), (dtype, &shape));
            assert_eq!(ckpt.tensor(name, true).unwrap(), &bytes[..], "{name}");
        }
        assert_eq!(
            ckpt.read_file("train_state.json", true).unwrap(),
            br#"{"step": 3}"#
        );
    }
}

#[test]
fn shards_are_valid_safetensors_files() {
    let root = TempDir::new();
    let dir = root.0.join("c");
    save(&dir, &sample(), 100, Publish::Directory);
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let weight_map = index["weight_map"].as_object().unwrap();
    assert_eq!(weight_map.len(), sample().len());
    for (name, _, shape, bytes) in sample() {
        let file = fs::read(dir.join(weight_map[name].as_str().unwrap())).unwrap();
        let st = SafeTensors::deserialize(&file).unwrap();
        let view = st.tensor(name).unwrap();
        assert_eq!(view.shape(), &shape[..]);
        assert_eq!(view.data(), &bytes[..]);
    }
}

#[test]
fn a_flipped_byte_is_reported_with_its_shard_and_tensor() {
    let root = TempDir::new();
    let dir = root.0.join("c");
    save(&dir, &sample(), 1 << 20, Publish::Directory);
    let ckpt = Checkpoint::open(&dir).unwrap();
    let offset = ckpt.info("experts").unwrap().start + 200;
    drop(ckpt);
    let shard = dir.join("model-00001-of-00001.safetensors");
    let mut bytes = fs::read(&shard).unwrap();
    bytes[offset] ^= 0x40;
    fs::write(&shard, bytes).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let err = ckpt.verify_all(&Cancel::never()).unwrap_err().to_string();
    assert!(
        err.contains("model-00001-of-00001.safetensors") && err.contains("\"experts\""),
        "{err}"
    );
    // The other tensors still read, and a read of the bad one without verification is allowed.
    assert!(ckpt.tensor("embed", true).is_ok());
    assert!(ckpt.tensor("experts", true).is_err());
    assert!(ckpt.tensor("experts", false).is_ok());
}

#[test]
fn a_row_slice_reads_only_the_chunks_it_overlaps() {
    let root = TempDir::new();
    let dir = root.0.join("c");
    let big = vec![("w", Dtype::F32, vec![100, 16], pattern(6400, 9))]; // 64-byte rows
    save(&dir, &big, 1 << 20, Publish::Directory);
    let ckpt = Checkpoint::open(&dir).unwrap();
    let rows = ckpt.rows("w", 10, 12, true).unwrap();
    assert_eq!(rows, &big[0].3[640..768]);
    // Rows 10..12 are bytes 640..768: exactly chunks 10 and 11 of 64 bytes.
    assert_eq!(ckpt.bytes_read(), 128);
    assert!(ckpt.rows("w", 99, 101, true).is_err());
}

#[test]
fn the_save_order_makes_every_file_durable_before_it_is_published() {
    let root = TempDir::new();
    let dir = root.0.join("step-1");
    let events = save(&dir, &sample(), 100, Publish::Latest { keep_last: Some(2) });
    let position = |op: Op, path: &Path| events.iter().position(|e| e.op == op && e.path == path);
    let rename = events
        .iter()
        .position(|e| e.op == Op::Rename && e.to.as_deref() == Some(&dir))
        .unwrap();
    let tmp = events[rename].path.clone();
    for name in fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()) {
        let path = tmp.join(&name);
        let write = position(Op::Write, &path).unwrap_or_else(|| panic!("{name:?} not written"));
        let fsync = position(Op::Fsync, &path).unwrap();
        assert!(write < fsync && fsync < rename, "{name:?}");
    }
    let tmp_sync = position(Op::DirFsync, &tmp).unwrap();
    let parent_sync = position(Op::DirFsync, &root.0).unwrap();
    assert!(tmp_sync < rename && rename < parent_sync);
    let latest = events
        .iter()
        .position(|e| e.op == Op::Rename && e.to.as_deref() == Some(&root.0.join("latest")))
        .unwrap();
    assert!(parent_sync < latest);
    assert!(events[latest + 1..]
        .iter()
        .any(|e| e.op == Op::DirFsync && e.path == root.0));
    assert_eq!(read_latest(&root.0).unwrap().as_deref(), Some("step-1"));
}

#[test]
fn only_the_last_k_checkpoints_are_kept() {
    let root = TempDir::new();
    for step in 1..=4 {
        let dir = root.0.join(format!("step-{step}"));
        save(
            &dir,
            &sample()[..2],
            1 << 20,
            Publish::Latest { keep_last: Some(2) },
        );
    }
    assert_eq!(list_checkpoints(&root.0).unwrap(), vec!["step-3", "step-4"]);
    assert_eq!(read_latest(&root.0).unwrap().as_deref(), Some("step-4"));
}

#[test]
fn an_existing_checkpoint_is_never_overwritten() {
    let root = TempDir::new();
    let dir = root.0.join("step-1");
    save(&dir, &sample()[..1], 1 << 20, Publish::Directory);
    let err = CheckpointWriter::create(&dir, SMALL_CHUNK).err().unwrap();
    assert!(err.to_string().contains("already exists"), "{err}");
}

#[test]
fn a_truncated_shard_is_a_clear_error() {
    let root = TempDir::new();
    let dir = root.0.join("c");
    save(&dir, &sample(), 1 << 20, Publish::Directory);
    let shard = dir.join("model-00001-of-00001.safetensors");
    let len = fs::metadata(&shard).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let err = Checkpoint::open(&dir).err().unwrap().to_string();
    assert!(
        err.contains("truncated") && err.contains("model-00001-of-00001"),
        "{err}"
    );
    // Without the manifest, the header parser catches it too.
    fs::remove_file(dir.join("manifest.json")).unwrap();
    let err = Checkpoint::open(&dir).err().unwrap().to_string();
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn a_wrong_data_length_is_rejected_before_anything_is_written() {
    let root = TempDir::new();
    let data = [0u8; 10];
    let shard = ShardSpec {
        file_name: "model-00001-of-00001.safetensors".into(),
        group: "model".into(),
        tensors: vec![TensorRef {
            name: "w".into(),
            dtype: Dtype::F32,
            shape: vec![4],
            data: &data,
        }],
    };
    let mut writer = CheckpointWriter::create(&root.0.join("c"), SMALL_CHUNK).unwrap();
    let err = writer
        .write_shards(&[shard], &Cancel::never())
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"w\"") && err.contains("16"), "{err}");
}

/// Two writers of one checkpoint (ranks of a sharded save): rows 0..2 of `w` from the
/// committing writer, rows 2..4 from a joined one, one manifest recording the pieces.
fn save_in_two_pieces(root: &Path, pieces: &[(&str, &str, usize, usize)]) -> Result<Vec<Event>> {
    let rows = pattern(4 * 8, 7); // [4, 2] f32
    let final_dir = root.join("step-1");
    let mut first = CheckpointWriter::create(&final_dir, SMALL_CHUNK)?;
    let mut second = CheckpointWriter::join(&final_dir, SMALL_CHUNK)?;
    let spec = |file: &str, name: &str, data: &'static [u8]| ShardSpec {
        file_name: file.into(),
        group: "model".into(),
        tensors: vec![TensorRef {
            name: name.into(),
            dtype: Dtype::F32,
            shape: vec![2, 2],
            data,
        }],
    };
    let a: &'static [u8] = Box::leak(rows[..16].to_vec().into_boxed_slice());
    let b: &'static [u8] = Box::leak(rows[16..].to_vec().into_boxed_slice());
    first.write_shards(
        &[spec("model-00001-of-00002.safetensors", "w#rows=0:2", a)],
        &Cancel::never(),
    )?;
    second.write_shards(
        &[spec("model-00002-of-00002.safetensors", "w#rows=2:4", b)],
        &Cancel::never(),
    )?;
    assert!(
        second.write_file("x.json", b"{}").is_err(),
        "a joined writer writes shards only"
    );
    let part = second.into_part()?;
    first.merge_part(part)?;
    first.add_pieces(
        "w",
        manifest::PiecedTensor {
            dtype: "F32".into(),
            shape: vec![4, 2],
            pieces: pieces
                .iter()
                .map(|&(file, tensor, s, e)| manifest::Piece {
                    file: file.into(),
                    tensor: tensor.into(),
                    rows: [s, e],
                })
                .collect(),
        },
    )?;
    first.commit(Publish::Latest { keep_last: None })
}

#[test]
fn joined_writers_commit_one_checkpoint_whose_pieces_cover_the_rows() {
    let root = TempDir::new();
    save_in_two_pieces(
        &root.0,
        &[
            ("model-00002-of-00002.safetensors", "w#rows=2:4", 2, 4),
            ("model-00001-of-00002.safetensors", "w#rows=0:2", 0, 2),
        ],
    )
    .unwrap();
    assert_eq!(read_latest(&root.0).unwrap().as_deref(), Some("step-1"));
    let ckpt = Checkpoint::open(&root.0.join("step-1")).unwrap();
    ckpt.verify_all(&Cancel::never()).unwrap();
    assert_eq!(ckpt.pieces()["w"].shape, vec![4, 2]);
    let rows = pattern(4 * 8, 7);
    assert_eq!(ckpt.tensor("w#rows=2:4", true).unwrap(), &rows[16..]);
    let index: serde_json::Value = serde_json::from_slice(
        &fs::read(root.0.join("step-1/model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(index["metadata"]["total_size"], 32);
}

#[test]
fn pieces_with_a_gap_an_overlap_or_a_wrong_shard_are_refused_naming_file_and_tensor() {
    let cases: [(&[(&str, &str, usize, usize)], &str); 4] = [
        (
            &[("model-00001-of-00002.safetensors", "w#rows=0:2", 0, 2)],
            "rows 2..4 are in no piece",
        ),
        (
            &[
                ("model-00001-of-00002.safetensors", "w#rows=0:2", 0, 2),
                ("model-00002-of-00002.safetensors", "w#rows=2:4", 1, 3),
            ],
            "overlaps piece \"w#rows=0:2\" (rows 0..2) in model-00001-of-00002.safetensors",
        ),
        (
            &[
                ("model-00001-of-00002.safetensors", "w#rows=0:2", 0, 2),
                ("model-00009-of-00009.safetensors", "w#rows=2:4", 2, 4),
            ],
            "no shard \"model-00009-of-00009.safetensors\"",
        ),
        (
            &[
                ("model-00002-of-00002.safetensors", "w#rows=2:4", 2, 4),
                ("model-00002-of-00002.safetensors", "w#rows=0:2", 0, 2),
            ],
            "model-00002-of-00002.safetensors holds no tensor \"w#rows=0:2\"",
        ),
    ];
    for (pieces, expected) in cases {
        let root = TempDir::new();
        let err = save_in_two_pieces(&root.0, pieces).unwrap_err().to_string();
        assert!(
            err.contains("tensor \"w\"") && err.contains(expected),
            "{err}"
        );
        assert!(err.contains("manifest.json"), "{err}");
        // Nothing was committed: no checkpoint, no `latest`.
        assert!(list_checkpoints(&root.0).unwrap().is_empty());
        assert_eq!(read_latest(&root.0).unwrap(), None);
    }
}

#[test]
fn a_reader_refuses_a_manifest_whose_pieces_leave_a_gap_and_names_a_missing_shard() {
    let root = TempDir::new();
    save_in_two_pieces(
        &root.0,
        &[
            ("model-00001-of-00002.safetensors", "w#rows=0:2", 0, 2),
            ("model-00002-of-00002.safetensors", "w#rows=2:4", 2, 4),
        ],
    )
    .unwrap();
    let dir = root.0.join("step-1");
    // A shard gone from the directory: the error names the file and the whole tensor.
    fs::rename(
        dir.join("model-00002-of-00002.safetensors"),
        root.0.join("moved"),
    )
    .unwrap();
    let err = Checkpoint::open(&dir).err().unwrap().to_string();
    assert!(
        err.contains("model-00002-of-00002.safetensors") && err.contains("rows of \"w\""),
        "{err}"
    );
    fs::rename(
        root.0.join("moved"),
        dir.join("model-00002-of-00002.safetensors"),
    )
    .unwrap();
    // A manifest edited to drop a piece.
    let path = dir.join(manifest::MANIFEST_FILE);
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    manifest["pieces"]["w"]["pieces"]
        .as_array_mut()
        .unwrap()
        .pop();
    fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let err = Checkpoint::open(&dir).err().unwrap().to_string();
    assert!(
        err.contains("tensor \"w\"") && err.contains("are in no piece"),
        "{err}"
    );
}

#[test]
fn a_joined_writer_needs_the_staging_directory_and_cannot_commit() {
    let root = TempDir::new();
    let err = CheckpointWriter::join(&root.0.join("step-1"), SMALL_CHUNK)
        .err()
        .unwrap();
    assert!(err.to_string().contains("does not exist"), "{err}");
    let _first = CheckpointWriter::create(&root.0.join("step-1"), SMALL_CHUNK).unwrap();
    let joined = CheckpointWriter::join(&root.0.join("step-1"), SMALL_CHUNK).unwrap();
    assert!(joined.commit(Publish::Directory).is_err());
}
