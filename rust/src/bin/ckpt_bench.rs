//! Checkpoint I/O of the pure-Rust core against plain file I/O on the same bytes.
//!
//!     cargo run --release --bin ckpt_bench [-- --quick] [--mib N] [--dir DIR]
//!
//! Measures (median of 5, 1 with --quick), on N MiB (default 1024) of tensors of 4-16 MiB:
//! * save into the page cache (no fsync) vs the same bytes written by one thread per core;
//! * durable save (fsynced, renamed, `latest` moved) vs one thread per core writing and fsyncing;
//! * load with every chunk verified vs reading every file into memory (`std::fs::read`), and vs
//!   single-thread memcpy bandwidth.
//!
//! Prints a table and one JSON line of ratios. Figures from a shared machine are preliminary.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use k2_native::checkpoint::{plan, Checkpoint, CheckpointWriter, Publish, TensorRef, WriteOptions};
use k2_native::interrupt::Cancel;
use safetensors::Dtype;

const MIB: usize = 1 << 20;

struct Args {
    mib: usize,
    repeats: usize,
    dir: PathBuf,
}

fn parse_args() -> Args {
    let mut args = Args {
        mib: 1024,
        repeats: 5,
        dir: std::env::temp_dir(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => {
                args.mib = 64;
                args.repeats = 1;
            }
            "--mib" => args.mib = it.next().and_then(|v| v.parse().ok()).expect("--mib N"),
            "--dir" => args.dir = PathBuf::from(it.next().expect("--dir DIR")),
            other => panic!("unknown argument {other}; use --quick, --mib N, --dir DIR"),
        }
    }
    args
}

/// Tensors of 4, 8 and 16 MiB filled with a cheap pattern, `mib` MiB in all.
fn make_tensors(mib: usize) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut used = 0;
    let mut i = 0usize;
    while used < mib * MIB {
        let rows: usize = [1024, 2048, 4096][i % 3];
        let data: Vec<u8> = (0..rows * 4096)
            .map(|j: usize| (j.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        used += data.len();
        out.push((format!("w{i}"), vec![rows, 1024], data));
        i += 1;
    }
    out
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

fn sync_all() {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
}

/// A measured case: untimed preparation, then the timed work.
type Case<'a> = (&'a str, Box<dyn FnMut() + 'a>, Box<dyn FnMut() + 'a>);

/// Median seconds of each case, the cases run round-robin so that a noisy neighbour slows them
/// alike; dirty pages are flushed (untimed) before every run.
fn compare(repeats: usize, mut cases: Vec<Case<'_>>) -> Vec<(String, f64)> {
    let mut times: Vec<Vec<f64>> = cases.iter().map(|_| Vec::new()).collect();
    for _ in 0..repeats {
        for (i, (_, before, run)) in cases.iter_mut().enumerate() {
            before();
            sync_all();
            let start = Instant::now();
            run();
            times[i].push(start.elapsed().as_secs_f64());
        }
    }
    cases
        .iter()
        .zip(times)
        .map(|((name, _, _), t)| (name.to_string(), median(t)))
        .collect()
}

fn save(dir: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)], durable: bool) {
    let refs: Vec<TensorRef<'_>> = tensors
        .iter()
        .map(|(n, s, d)| TensorRef {
            name: n.clone(),
            dtype: Dtype::F32,
            shape: s.clone(),
            data: d,
        })
        .collect();
    let shards = plan::plan_group("model", refs, 5 << 30);
    let options = WriteOptions {
        durable,
        ..WriteOptions::default()
    };
    let mut writer = CheckpointWriter::create(&dir.join("step-0"), options).unwrap();
    writer.write_shards(&shards, &Cancel::never()).unwrap();
    writer.commit(Publish::Latest { keep_last: None }).unwrap();
}

fn plain_write(
    dir: &Path,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
    streams: usize,
    durable: bool,
) {
    std::thread::scope(|scope| {
        for s in 0..streams {
            scope.spawn(move || {
                let path = dir.join(format!("part{s}"));
                let mut file = File::create(&path).unwrap();
                for (_, _, data) in tensors.iter().skip(s).step_by(streams) {
                    file.write_all(data).unwrap();
                }
                if durable {
                    file.sync_all().unwrap();
                }
            });
        }
    });
}

fn fresh(dir: &Path) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
}

fn main() {
    let args = parse_args();
    let streams = std::thread::available_parallelism().map_or(1, |n| n.get());
    let scratch = args
        .dir
        .join(format!("k2-ckpt-bench-{}", std::process::id()));
    let tensors = make_tensors(args.mib);
    let bytes: usize = tensors.iter().map(|t| t.2.len()).sum();
    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!(
        "# ckpt_bench (Rust core): {} MiB in {} tensors, {streams} cores, rayon {} threads",
        bytes / MIB,
        tensors.len(),
        rayon::current_num_threads()
    );
    println!(
        "# scratch {}; preliminary figures if the machine is shared",
        scratch.display()
    );

    let (k2_dir, plain_dir) = (scratch.join("k2"), scratch.join("plain"));
    let ckpt_dir = k2_dir.join("step-0");
    let r = args.repeats;
    let t = &tensors;
    let mut rows = compare(
        r,
        vec![
            (
                "save, page cache: k2",
                Box::new(|| fresh(&k2_dir)),
                Box::new(|| save(&k2_dir, t, false)),
            ),
            (
                "save, page cache: plain multi-stream write",
                Box::new(|| fresh(&plain_dir)),
                Box::new(|| plain_write(&plain_dir, t, streams, false)),
            ),
        ],
    );
    rows.extend(compare(
        r,
        vec![
            (
                "save, fsynced: k2 (+rename, latest)",
                Box::new(|| fresh(&k2_dir)),
                Box::new(|| save(&k2_dir, t, true)),
            ),
            (
                "save, fsynced: plain multi-stream write+fsync",
                Box::new(|| fresh(&plain_dir)),
                Box::new(|| plain_write(&plain_dir, t, streams, true)),
            ),
        ],
    ));
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src);
    rows.extend(compare(
        r,
        vec![
            (
                "load, every chunk verified: k2",
                Box::new(|| ()),
                Box::new(|| {
                    let ckpt = Checkpoint::open(&ckpt_dir).unwrap();
                    ckpt.verify_all(&Cancel::never()).unwrap();
                }),
            ),
            (
                "load: std::fs::read of every file",
                Box::new(|| ()),
                Box::new(|| {
                    for entry in fs::read_dir(&ckpt_dir).unwrap() {
                        std::hint::black_box(fs::read(entry.unwrap().path()).unwrap());
                    }
                }),
            ),
            (
                "memcpy, 1 thread",
                Box::new(|| ()),
                Box::new(|| dst.copy_from_slice(std::hint::black_box(&src))),
            ),
        ],
    ));
    let _ = fs::remove_dir_all(&scratch);

    let secs = |name: &str| rows.iter().find(|(n, _)| n == name).expect("measured").1;
    println!("\n{:<46} {:>8} {:>7}", "measurement", "seconds", "GiB/s");
    for (name, s) in &rows {
        println!("{name:<46} {s:8.3} {:7.2}", gib / s);
    }
    println!(
        "{{\"bench\": \"ckpt_bench\", \"mib\": {}, \"save_page_cache_vs_plain\": {:.2}, \"durable_slowdown_vs_plain\": {:.3}, \"load_vs_fs_read\": {:.2}, \"load_fraction_of_memcpy\": {:.2}}}",
        bytes / MIB,
        secs("save, page cache: plain multi-stream write") / secs("save, page cache: k2"),
        secs("save, fsynced: k2 (+rename, latest)") / secs("save, fsynced: plain multi-stream write+fsync") - 1.0,
        secs("load: std::fs::read of every file") / secs("load, every chunk verified: k2"),
        secs("memcpy, 1 thread") / secs("load, every chunk verified: k2"),
    );
}
