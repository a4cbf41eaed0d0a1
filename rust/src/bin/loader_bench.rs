//! Benchmark of the token loader's Rust core (no Python): shuffled int64 batches of
//! 32 x 1024 tokens from a memory-mapped u16 shard, against this machine's memcpy bandwidth.
//!
//!     cargo run --release --bin loader_bench [-- --quick]
//!
//! Rows:
//! * `k2 loader, N threads` — `TokenLoader::next_batch` in a loop (inputs, targets and position
//!   ids: 3 int64 arrays per batch), prefetching with N background threads; the consumer hands
//!   the buffers back to the loader's pool, as the Python binding does when the arrays are freed;
//! * `gather, 1 thread` — the baseline: the same random windows copied and widened to int64 in the
//!   calling thread, inputs and targets only, with no prefetch and no position ids;
//! * `memcpy` — `copy_from_slice` of a 256 MiB buffer (64 MiB with `--quick`), the ceiling for
//!   bytes delivered.
//!
//! Prints a header, a table, and one JSON line with the ratios.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k2_native::data::loader::{LoaderConfig, TokenLoader};
use k2_native::data::shuffle::mix64;
use k2_native::data::ShardWriter;

const SEQ_LEN: u64 = 1024;
const BATCH: u64 = 32;
const VOCAB: u32 = 8192;

struct Row {
    name: String,
    tokens_per_s: f64,
    bytes_per_s: f64,
}

/// Run `step` (which returns bytes delivered) repeatedly for about `budget`; return (calls/s,
/// bytes/s).
fn measure(budget: Duration, mut step: impl FnMut() -> u64) -> (f64, f64) {
    for _ in 0..3 {
        step();
    }
    let start = Instant::now();
    let (mut calls, mut bytes) = (0u64, 0u64);
    while start.elapsed() < budget {
        bytes += step();
        calls += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    (calls as f64 / secs, bytes as f64 / secs)
}

fn write_dataset(dir: &std::path::Path, tokens: u64) -> (PathBuf, Vec<u16>) {
    let path = dir.join("bench.k2tok");
    let mut writer = ShardWriter::create(&path, VOCAB).expect("create the bench shard");
    let mut stream = Vec::with_capacity(tokens as usize);
    let mut doc = Vec::new();
    let mut i = 0u64;
    while (stream.len() as u64) < tokens {
        // Documents of 200..4200 tokens of pseudo-random ids.
        let len = 200 + mix64(i) % 4000;
        doc.clear();
        doc.extend((0..len).map(|j| (mix64(i * 7919 + j) % VOCAB as u64) as u32));
        stream.extend(doc.iter().map(|&t| t as u16));
        writer.add_document(&doc).expect("write the bench shard");
        i += 1;
    }
    writer.finish().expect("finish the bench shard");
    (path, stream)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let json = run(quick);
    println!("{json}");
}

/// Run the benchmark, print the header and table, and return the final JSON line.
fn run(quick: bool) -> String {
    let budget = Duration::from_millis(if quick { 200 } else { 3000 });
    let tokens: u64 = if quick { 1 << 22 } else { 1 << 26 };
    let dir = std::env::temp_dir().join(format!("k2-loader-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    let (path, stream) = write_dataset(&dir, tokens);

    println!(
        "k2 loader bench (Rust core): {} tokens (u16 shard), batches of {BATCH} x {SEQ_LEN}",
        stream.len()
    );
    println!(
        "machine: {} CPUs, {} {}; quick={quick}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        std::env::consts::OS,
        std::env::consts::ARCH
    );

    let batch_tokens = BATCH * SEQ_LEN;
    let mut rows = Vec::new();
    for threads in [1usize, 2] {
        let config = LoaderConfig {
            seq_len: SEQ_LEN,
            batch_size: BATCH,
            seed: 0,
            rank: 0,
            world_size: 1,
            prefetch: 8,
            threads,
        };
        let loader = TokenLoader::open(std::slice::from_ref(&path), config, true)
            .expect("open the bench shard");
        let (per_s, bytes_per_s) = measure(budget, || {
            let b = loader.next_batch().expect("a batch");
            std::hint::black_box(&b);
            let bytes = (b.inputs.len() + b.targets.len() + b.positions.len() + b.loss_mask.len())
                as u64
                * 8;
            loader.recycle(b); // as the Python binding does when the arrays are freed
            bytes
        });
        rows.push(Row {
            name: format!("k2 loader, {threads} thread(s)"),
            tokens_per_s: per_s * batch_tokens as f64,
            bytes_per_s,
        });
    }

    let samples = (stream.len() as u64 - 1) / SEQ_LEN;
    let mut counter = 0u64;
    let (per_s, bytes_per_s) = measure(budget, || {
        let n = batch_tokens as usize;
        let (mut x, mut y) = (vec![0i64; n], vec![0i64; n]);
        for row in 0..BATCH as usize {
            counter += 1;
            let start = (mix64(counter) % samples * SEQ_LEN) as usize;
            let window = &stream[start..start + SEQ_LEN as usize + 1];
            let t = SEQ_LEN as usize;
            for j in 0..t {
                x[row * t + j] = window[j] as i64;
                y[row * t + j] = window[j + 1] as i64;
            }
        }
        std::hint::black_box((&x, &y));
        2 * n as u64 * 8
    });
    rows.push(Row {
        name: "gather, 1 thread (baseline)".into(),
        tokens_per_s: per_s * batch_tokens as f64,
        bytes_per_s,
    });

    let size = if quick { 64 << 20 } else { 256 << 20 };
    let src = vec![1u8; size];
    let mut dst = vec![0u8; size];
    let (_, memcpy) = measure(budget, || {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        size as u64
    });

    println!();
    println!("{:<32} {:>14} {:>14}", "", "Mtokens/s", "GB/s out");
    for r in &rows {
        println!(
            "{:<32} {:>14.1} {:>14.2}",
            r.name,
            r.tokens_per_s / 1e6,
            r.bytes_per_s / 1e9
        );
    }
    let label = format!("memcpy ({} MiB)", size >> 20);
    println!("{label:<32} {:>14} {:>14.2}", "-", memcpy / 1e9);

    let k2 = &rows[1];
    let gather = &rows[2];
    let _ = std::fs::remove_dir_all(&dir);
    format!(
        "{{\"bench\": \"loader_rust\", \"quick\": {quick}, \"k2_tokens_per_s\": {:.0}, \"gather_tokens_per_s\": {:.0}, \
         \"k2_vs_gather\": {:.3}, \"k2_bytes_per_s\": {:.0}, \"memcpy_bytes_per_s\": {:.0}, \"k2_vs_memcpy\": {:.3}}}",
        k2.tokens_per_s,
        gather.tokens_per_s,
        k2.tokens_per_s / gather.tokens_per_s,
        k2.bytes_per_s,
        memcpy,
        k2.bytes_per_s / memcpy
    )
}

#[cfg(test)]
mod tests {
    /// The `--quick` smoke run: it completes and reports positive rates.
    #[test]
    fn quick_run_reports_its_ratios() {
        let json = super::run(true);
        assert!(json.starts_with("{\"bench\": \"loader_rust\""), "{json}");
        assert!(!json.contains("\"k2_tokens_per_s\": 0,"), "{json}");
    }
}
