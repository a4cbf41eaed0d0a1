//! Benchmark of the shared-memory broadcast pipeline alone (no Python, no torch).
//!
//! The publisher (this process) publishes a synthetic weight set to 1, 2 and 4 worker processes
//! (this binary re-run as `worker`), each of which copies every version into its own private
//! buffer, in two set-ups:
//!
//! * `ring`: two slots; workers copy each bucket out as it arrives;
//! * `retained, in place`: a slot per bucket; workers copy the whole version once it has
//!   landed (how `WeightSubscriber` applies versions to a CPU model by default).
//!
//! The publisher stages from one private buffer with every core (`Publisher::stage_from`).
//! Baseline: single-threaded memcpy of the same bytes between two private buffers. Prints a
//! header, a table, and one final JSON line.
//!
//! ```sh
//! cargo run --release --bin broadcast_bench -- [--quick] [--mib 1024] [--bucket-mib 64]
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use k2_native::broadcast::{BucketPlan, PublishOptions, Publisher, Subscriber, TensorSpec};
use k2_native::interrupt::Cancel;

const TIMEOUT: Duration = Duration::from_secs(120);

struct Args {
    mib: u64,
    bucket_mib: u64,
    workers: Vec<usize>,
    rounds: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        mib: 1024,
        bucket_mib: 64,
        workers: vec![1, 2, 4],
        rounds: 3,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let value = || {
            argv.get(i + 1)
                .and_then(|v| v.parse::<u64>().ok())
                .expect("a number after the flag")
        };
        match argv[i].as_str() {
            "--quick" => {
                args.mib = 64;
                args.bucket_mib = 8;
                args.workers = vec![1, 2];
                args.rounds = 2;
            }
            "--mib" => {
                args.mib = value();
                i += 1;
            }
            "--bucket-mib" => {
                args.bucket_mib = value();
                i += 1;
            }
            other => panic!("unknown argument {other}; see the module docs"),
        }
        i += 1;
    }
    args
}

/// Synthetic weights: 16 MiB tensors (the last one shorter) adding up to `mib` MiB.
fn plan(mib: u64, bucket_mib: u64) -> BucketPlan {
    let total = mib << 20;
    let piece = 16u64 << 20;
    let tensors = (0..total.div_ceil(piece))
        .map(|i| TensorSpec {
            name: format!("layers.{i}.weight"),
            dtype: "bfloat16".into(),
            shape: vec![(piece.min(total - i * piece)) / 2],
            itemsize: 2,
        })
        .collect();
    BucketPlan::new(tensors, bucket_mib << 20).expect("a valid plan")
}

/// A buffer of `n` bytes with every page touched.
fn touched(n: usize, value: u8) -> Vec<u8> {
    vec![value; n]
}

/// Worker process: join, receive `rounds` versions into a private buffer, exit.
fn worker(path: &Path, name: &str, rounds: usize) {
    let mut sub = Subscriber::join(path, name, TIMEOUT, false, &Cancel::never()).expect("join");
    let plan = sub.plan().clone();
    let mut landing = touched(plan.arena_bytes() as usize, 0);
    let in_place = sub.segment().retains();
    for _ in 0..rounds {
        sub.next_round(TIMEOUT, &Cancel::never())
            .expect("round")
            .expect("a round within the timeout");
        if in_place {
            sub.wait_whole(&Cancel::never()).expect("whole version");
            let base = landing.as_mut_ptr() as usize;
            let copies: Vec<Vec<(u64, usize, u64)>> = (0..plan.num_buckets())
                .map(|b| {
                    let r = plan.bucket_range(b);
                    vec![(0, base + r.start as usize, r.end - r.start)]
                })
                .collect();
            // SAFETY: every copy lands inside `landing`, which nothing else touches.
            unsafe { sub.copy_in_place(&copies) }.expect("copy");
            continue;
        }
        for b in 0..plan.num_buckets() {
            let r = plan.bucket_range(b);
            sub.receive(b, &Cancel::never(), |bytes| {
                landing[r.start as usize..r.end as usize].copy_from_slice(bytes)
            })
            .expect("bucket");
        }
    }
    // Keep the copies observable so they are not optimized away.
    std::hint::black_box(&landing);
}

/// Publish `rounds` versions to `n` worker processes; the best time of a round (after one
/// warm-up round).
fn publish_to(n: usize, plan: &BucketPlan, source: &[u8], rounds: usize, retain: bool) -> Duration {
    let path = PathBuf::from(format!(
        "/dev/shm/k2-broadcast-bench-{}-{n}",
        std::process::id()
    ));
    let options = PublishOptions {
        checksums: false,
        retain,
        timeout: TIMEOUT,
    };
    let mut publisher = Publisher::create(&path, plan.clone(), options).expect("publisher");
    // One tensor's address per planned tensor, in plan order.
    let sources: Vec<usize> = (0..plan.tensors().len())
        .map(|t| source.as_ptr() as usize + plan.offset(t) as usize)
        .collect();
    let exe = std::env::current_exe().expect("own path");
    let mut children: Vec<Child> = (0..n)
        .map(|i| {
            Command::new(&exe)
                .args([
                    "worker",
                    path.to_str().unwrap(),
                    &format!("w{i}"),
                    &(rounds + 1).to_string(),
                ])
                .spawn()
                .expect("spawn worker")
        })
        .collect();
    let deadline = Instant::now() + TIMEOUT;
    while publisher.workers().len() < n {
        assert!(Instant::now() < deadline, "workers did not join");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut best = Duration::MAX;
    for round in 0..=rounds {
        let start = Instant::now();
        publisher
            .begin_round(round as u64 + 1, false, &Cancel::never())
            .expect("round");
        for b in 0..plan.num_buckets() {
            // SAFETY: `source` mirrors the arena, so every tensor's bytes lie inside it, and
            // nothing writes it.
            unsafe { publisher.stage_from(b, &sources, &Cancel::never()) }.expect("stage");
        }
        let failures = publisher.finish_round(&Cancel::never()).expect("finish");
        assert!(failures.is_empty(), "{failures:?}");
        if round > 0 {
            best = best.min(start.elapsed());
        }
    }
    for child in &mut children {
        assert!(child.wait().expect("worker exit").success());
    }
    best
}

/// Best single-threaded memcpy time of `src` into a private buffer.
fn memcpy_time(src: &[u8], rounds: usize) -> Duration {
    let mut dst = touched(src.len(), 0);
    let mut best = Duration::MAX;
    for _ in 0..=rounds {
        let start = Instant::now();
        dst.copy_from_slice(src);
        std::hint::black_box(&dst);
        best = best.min(start.elapsed());
    }
    best
}

fn gbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("worker") {
        worker(
            Path::new(&argv[2]),
            &argv[3],
            argv[4].parse().expect("rounds"),
        );
        return;
    }
    let args = parse_args();
    let plan = plan(args.mib, args.bucket_mib);
    let bytes = plan.arena_bytes();
    let source = touched(bytes as usize, 0x5A);
    println!("# k2 broadcast_bench: shared-memory pipeline alone (Rust, no Python)");
    println!(
        "# machine: {} CPUs, {}; k2-native {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::env::consts::ARCH,
        env!("CARGO_PKG_VERSION")
    );
    println!(
        "# weights: {:.0} MiB in {} buckets of {} MiB; best of {} rounds after a warm-up",
        bytes as f64 / (1 << 20) as f64,
        plan.num_buckets(),
        args.bucket_mib,
        args.rounds
    );
    let memcpy = memcpy_time(&source, args.rounds);
    println!(
        "{:<30} {:>10} {:>16} {:>12}",
        "method", "time (s)", "GB/s per worker", "% memcpy"
    );
    println!(
        "{:<30} {:>10.3} {:>16.2} {:>12}",
        "memcpy (1 thread)",
        memcpy.as_secs_f64(),
        gbps(bytes, memcpy),
        "100"
    );
    let mut ratios = Vec::new();
    for (label, key, retain) in [
        ("ring", "ring", false),
        ("retained, in place", "in_place", true),
    ] {
        for &n in &args.workers {
            let t = publish_to(n, &plan, &source, args.rounds, retain);
            let share = gbps(bytes, t) / gbps(bytes, memcpy);
            println!(
                "{:<30} {:>10.3} {:>16.2} {:>12.0}",
                format!("{label}, {n} worker(s)"),
                t.as_secs_f64(),
                gbps(bytes, t),
                100.0 * share
            );
            ratios.push(format!("\"{key}_{n}w_of_memcpy\": {share:.3}"));
        }
    }
    println!(
        "{{\"bench\": \"broadcast_bench\", \"bytes\": {bytes}, \"memcpy_gbps\": {:.3}, {}}}",
        gbps(bytes, memcpy),
        ratios.join(", ")
    );
}
