//! Whole-protocol tests of the module: a publisher and subscribers on a small segment in
//! /dev/shm, in threads of one process.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::*;
use crate::interrupt::Cancel;

fn shm_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm".into()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!(
        "k2-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Three tensors of 300 + 1000 + 40 bytes in 512-byte buckets: four buckets.
fn plan() -> BucketPlan {
    let spec = |name: &str, n: u64| TensorSpec {
        name: name.into(),
        dtype: "uint8".into(),
        shape: vec![n],
        itemsize: 1,
    };
    BucketPlan::new(vec![spec("a", 300), spec("b", 1000), spec("c", 40)], 512).unwrap()
}

/// The arena of version `v`: byte i is (i * 7 + v) mod 256.
fn arena(plan: &BucketPlan, v: u64) -> Vec<u8> {
    (0..plan.arena_bytes())
        .map(|i| ((i * 7 + v) % 256) as u8)
        .collect()
}

fn create(path: &std::path::Path, checksums: bool, retain: bool, timeout: Duration) -> Publisher {
    let options = PublishOptions {
        checksums,
        retain,
        timeout,
    };
    Publisher::create(path, plan(), options).unwrap()
}

fn publish(
    publisher: &mut Publisher,
    version: u64,
    catch_up: bool,
) -> Result<Vec<WorkerFailure>, BroadcastError> {
    let plan = publisher.plan().clone();
    let data = arena(
        &plan,
        if catch_up {
            publisher.published_version()
        } else {
            version
        },
    );
    publisher.begin_round(version, catch_up, &Cancel::never())?;
    for b in 0..plan.num_buckets() {
        if catch_up && publisher.retains() {
            publisher.resend(b)?;
            continue;
        }
        let r = plan.bucket_range(b);
        publisher.stage(b, &Cancel::never(), |slot| {
            slot.copy_from_slice(&data[r.start as usize..r.end as usize])
        })?;
    }
    publisher.finish_round(&Cancel::never())
}

/// Receive one round and return (version, the whole arena as received).
fn receive(sub: &mut Subscriber, wait: Duration) -> Result<Option<(u64, Vec<u8>)>, BroadcastError> {
    let Some(round) = sub.next_round(wait, &Cancel::never())? else {
        return Ok(None);
    };
    let plan = sub.plan().clone();
    let mut out = vec![0u8; plan.arena_bytes() as usize];
    for b in 0..plan.num_buckets() {
        let r = plan.bucket_range(b);
        sub.receive(b, &Cancel::never(), |bytes| {
            out[r.start as usize..r.end as usize].copy_from_slice(bytes)
        })?;
    }
    sub.applied(round.version);
    Ok(Some((round.version, out)))
}

#[test]
fn every_worker_receives_every_version_bit_for_bit() {
    for retain in [false, true] {
        let path = shm_path("roundtrip");
        let mut publisher = create(&path, true, retain, Duration::from_secs(5));
        let workers: Vec<_> = (0..2)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut sub = Subscriber::join(
                        &path,
                        &format!("w{i}"),
                        Duration::from_secs(5),
                        true,
                        &Cancel::never(),
                    )
                    .unwrap();
                    (1..=3)
                        .map(|_| receive(&mut sub, Duration::from_secs(5)).unwrap().unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        while publisher.workers().len() < 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        for v in 1..=3 {
            assert_eq!(publish(&mut publisher, v, false).unwrap(), vec![]);
        }
        for w in workers {
            let got = w.join().unwrap();
            for (i, (v, bytes)) in got.into_iter().enumerate() {
                assert_eq!(v, i as u64 + 1);
                assert!(
                    bytes == arena(&plan(), v),
                    "version {v} arrived corrupted (retain {retain})"
                );
            }
        }
    }
}

/// Copy a whole landed version straight into `out` (the retained-segment path).
fn receive_in_place(sub: &mut Subscriber, out: &mut [u8]) -> Result<u64, BroadcastError> {
    let round = sub
        .next_round(Duration::from_secs(5), &Cancel::never())?
        .expect("a round");
    sub.wait_whole(&Cancel::never())?;
    let copies = in_place_copies(sub.plan(), out);
    // SAFETY: every copy lands inside `out`, which nothing else touches meanwhile.
    unsafe { sub.copy_in_place(&copies)? };
    sub.applied(round.version);
    Ok(round.version)
}

/// Per bucket, copies of its whole window into the same window of `out` (the arena).
fn in_place_copies(plan: &BucketPlan, out: &mut [u8]) -> Vec<Vec<(u64, usize, u64)>> {
    (0..plan.num_buckets())
        .map(|b| {
            let r = plan.bucket_range(b);
            vec![(
                0,
                out.as_mut_ptr() as usize + r.start as usize,
                r.end - r.start,
            )]
        })
        .collect()
}

#[test]
fn a_retained_segment_is_copied_in_place_and_serves_catch_ups_without_restaging() {
    let path = shm_path("retain");
    let mut publisher = create(&path, true, true, Duration::from_secs(5));
    assert!(publisher.retains());
    let mut first = Subscriber::join(
        &path,
        "first",
        Duration::from_secs(5),
        true,
        &Cancel::never(),
    )
    .unwrap();
    let worker = std::thread::spawn(move || {
        let mut out = vec![0u8; plan().arena_bytes() as usize];
        let got: Vec<_> = (0..2)
            .map(|_| {
                let v = receive_in_place(&mut first, &mut out).unwrap();
                (v, out == arena(&plan(), v))
            })
            .collect();
        (first, got)
    });
    for v in 1..=2 {
        assert_eq!(publish(&mut publisher, v, false).unwrap(), vec![]);
    }
    let (_first, got) = worker.join().unwrap();
    assert_eq!(got, vec![(1, true), (2, true)]);

    // A late joiner is served from the slots as they are: resend moves no bytes.
    let mut late = Subscriber::join(
        &path,
        "late",
        Duration::from_secs(5),
        true,
        &Cancel::never(),
    )
    .unwrap();
    assert!(publisher.catch_up_pending());
    let catcher = std::thread::spawn(move || {
        let mut out = vec![0u8; plan().arena_bytes() as usize];
        let v = receive_in_place(&mut late, &mut out).unwrap();
        (v, out == arena(&plan(), v))
    });
    publisher.begin_round(0, true, &Cancel::never()).unwrap();
    for b in 0..plan().num_buckets() {
        publisher.resend(b).unwrap();
    }
    assert_eq!(publisher.finish_round(&Cancel::never()).unwrap(), vec![]);
    assert_eq!(catcher.join().unwrap(), (2, true));
}

#[test]
fn a_publish_round_waits_for_an_in_place_copy_and_names_one_that_never_ends() {
    let path = shm_path("reading");
    let timeout = Duration::from_millis(300);
    let mut publisher = create(&path, false, true, timeout);
    let mut sub = Subscriber::join(
        &path,
        "slowpoke",
        Duration::from_secs(5),
        false,
        &Cancel::never(),
    )
    .unwrap();
    let sub_thread = std::thread::spawn(move || {
        sub.next_round(Duration::from_secs(5), &Cancel::never())
            .unwrap()
            .unwrap();
        sub.wait_whole(&Cancel::never()).unwrap();
        sub
    });
    let data = arena(&plan(), 1);
    publisher.begin_round(1, false, &Cancel::never()).unwrap();
    for b in 0..plan().num_buckets() {
        let r = plan().bucket_range(b);
        publisher
            .stage(b, &Cancel::never(), |slot| {
                slot.copy_from_slice(&data[r.start as usize..r.end as usize])
            })
            .unwrap();
    }
    let mut sub = sub_thread.join().unwrap();
    // The worker has the whole version but has not copied it: the round ends without it.
    let failures = publisher.finish_round(&Cancel::never()).unwrap();
    assert_eq!(failures.len(), 1, "{failures:?}");

    // A new round began meanwhile: the copy refuses before touching the destination.
    let mut out = vec![0xEEu8; plan().arena_bytes() as usize];
    publisher.begin_round(2, false, &Cancel::never()).unwrap();
    let copies = in_place_copies(sub.plan(), &mut out);
    let err = unsafe { sub.copy_in_place(&copies) }.unwrap_err();
    assert!(err.message.contains("slowpoke"), "{err}");
    assert!(out.iter().all(|&x| x == 0xEE), "nothing may be copied");

    // A worker stuck in the middle of an in-place copy holds the next round off for the
    // timeout, and is then named.
    let record = publisher
        .segment()
        .control()
        .workers
        .iter()
        .position(|w| w.name() == "slowpoke")
        .unwrap();
    publisher.segment().control().workers[record]
        .reading
        .store(7, Ordering::SeqCst);
    let started = Instant::now();
    publisher.begin_round(3, false, &Cancel::never()).unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed >= timeout && elapsed < timeout * 5,
        "took {elapsed:?}"
    );
    for b in 0..plan().num_buckets() {
        publisher
            .stage(b, &Cancel::never(), |slot| slot.fill(3))
            .unwrap();
    }
    let failures = publisher.finish_round(&Cancel::never()).unwrap();
    assert!(
        failures
            .iter()
            .any(|f| f.worker == "slowpoke" && f.reason.contains("still copying")),
        "{failures:?}"
    );
}

#[test]
fn a_stalled_worker_is_named_after_the_timeout_and_the_others_complete() {
    let path = shm_path("stall");
    let timeout = Duration::from_millis(300);
    let mut publisher = create(&path, false, false, timeout);
    let mut healthy = Subscriber::join(
        &path,
        "healthy",
        Duration::from_secs(5),
        false,
        &Cancel::never(),
    )
    .unwrap();
    let mut stalled = Subscriber::join(
        &path,
        "stalled-7",
        Duration::from_secs(5),
        false,
        &Cancel::never(),
    )
    .unwrap();
    let reader = std::thread::spawn(move || {
        let got = receive(&mut healthy, Duration::from_secs(5))
            .unwrap()
            .unwrap();
        (healthy, got)
    });
    // The stalled worker takes the round and reads bucket 0, then stops.
    let round = std::thread::spawn(move || {
        stalled
            .next_round(Duration::from_secs(5), &Cancel::never())
            .unwrap()
            .unwrap();
        stalled.acquire(0, &Cancel::never()).unwrap();
        stalled
    });
    let started = Instant::now();
    let failures = publish(&mut publisher, 1, false).unwrap();
    let elapsed = started.elapsed();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].worker, "stalled-7");
    assert!(
        failures[0].reason.contains("bucket 0 of version 1"),
        "{}",
        failures[0].reason
    );
    assert!(
        elapsed >= timeout && elapsed < timeout * 5,
        "took {elapsed:?}"
    );
    let (_healthy, (v, bytes)) = reader.join().unwrap();
    assert_eq!((v, bytes == arena(&plan(), 1)), (1, true));

    // The stalled worker finds out it was evicted, rejoins, and catches up.
    let mut stalled = round.join().unwrap();
    let err = stalled.release(0).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Evicted, "{err}");
    stalled.rejoin().unwrap();
    assert!(publisher.catch_up_pending());
    let catcher = std::thread::spawn(move || {
        receive(&mut stalled, Duration::from_secs(5))
            .unwrap()
            .unwrap()
    });
    assert_eq!(publish(&mut publisher, 0, true).unwrap(), vec![]);
    let (v, bytes) = catcher.join().unwrap();
    assert_eq!((v, bytes == arena(&plan(), 1)), (1, true));
    assert!(!publisher.catch_up_pending());
}

#[test]
fn a_corrupted_bucket_fails_verification_naming_its_tensors() {
    let path = shm_path("checksum");
    let mut publisher = create(&path, true, false, Duration::from_secs(5));
    let mut sub = Subscriber::join(
        &path,
        "careful",
        Duration::from_secs(5),
        true,
        &Cancel::never(),
    )
    .unwrap();
    publisher.begin_round(1, false, &Cancel::never()).unwrap();
    publisher
        .stage(0, &Cancel::never(), |slot| slot.fill(1))
        .unwrap();
    // Flip a byte after the checksum was recorded.
    unsafe { *publisher.segment().slot_ptr(0).add(10) ^= 0xFF };
    sub.next_round(Duration::from_secs(1), &Cancel::never())
        .unwrap()
        .unwrap();
    let err = sub.acquire(0, &Cancel::never()).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Checksum);
    assert!(
        err.message.contains("bucket 0 of version 1") && err.message.contains("(tensors a)"),
        "{err}"
    );
}

#[test]
fn a_worker_waiting_on_a_silent_publisher_times_out_naming_it() {
    let path = shm_path("silent");
    let mut publisher = create(&path, false, false, Duration::from_secs(5));
    let mut sub = Subscriber::join(
        &path,
        "patient",
        Duration::from_millis(200),
        false,
        &Cancel::never(),
    )
    .unwrap();
    publisher.begin_round(1, false, &Cancel::never()).unwrap();
    sub.next_round(Duration::from_secs(1), &Cancel::never())
        .unwrap()
        .unwrap();
    let err = sub.acquire(0, &Cancel::never()).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Timeout);
    assert!(
        err.message.contains("worker patient") && err.message.contains("bucket 0 of version 1"),
        "{err}"
    );
    drop(publisher);
    let err = sub
        .next_round(Duration::from_secs(1), &Cancel::never())
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::PublisherGone, "{err}");
}

#[test]
fn a_joiner_never_mistakes_a_leavers_round_for_its_own() {
    let path = shm_path("reuse");
    let mut publisher = create(&path, false, false, Duration::from_millis(200));
    let mut first = Subscriber::join(
        &path,
        "first",
        Duration::from_secs(1),
        false,
        &Cancel::never(),
    )
    .unwrap();
    let reader = std::thread::spawn(move || {
        receive(&mut first, Duration::from_secs(5))
            .unwrap()
            .unwrap();
        first // leaves when dropped below, after the round
    });
    publish(&mut publisher, 1, false).unwrap();
    drop(reader.join().unwrap());
    let mut second = Subscriber::join(
        &path,
        "second",
        Duration::from_secs(1),
        false,
        &Cancel::never(),
    )
    .unwrap();
    assert_eq!(
        second
            .next_round(Duration::from_millis(50), &Cancel::never())
            .unwrap(),
        None
    );
    let catcher = std::thread::spawn(move || {
        receive(&mut second, Duration::from_secs(5))
            .unwrap()
            .unwrap()
    });
    assert_eq!(publish(&mut publisher, 0, true).unwrap(), vec![]);
    assert_eq!(catcher.join().unwrap().0, 1);
}

#[test]
fn a_name_in_use_by_a_live_worker_is_refused() {
    let path = shm_path("names");
    let _publisher = create(&path, false, false, Duration::from_secs(5));
    let _first = Subscriber::join(
        &path,
        "twin",
        Duration::from_secs(1),
        false,
        &Cancel::never(),
    )
    .unwrap();
    let err = Subscriber::join(
        &path,
        "twin",
        Duration::from_secs(1),
        false,
        &Cancel::never(),
    )
    .err()
    .unwrap();
    assert_eq!(err.kind, ErrorKind::Join);
    assert!(err.message.contains("twin"), "{err}");
}

#[test]
fn joining_without_a_publisher_times_out_naming_the_path() {
    let path = shm_path("nobody");
    let err = Subscriber::join(
        &path,
        "lonely",
        Duration::from_millis(50),
        false,
        &Cancel::never(),
    )
    .err()
    .unwrap();
    assert_eq!(err.kind, ErrorKind::Timeout);
    assert!(err.message.contains(path.to_str().unwrap()), "{err}");
}

#[test]
fn a_segment_whose_publisher_exited_fails_at_once_naming_worker_and_publisher() {
    let path = shm_path("orphan");
    let publisher = create(&path, false, false, Duration::from_secs(5));
    // Make the segment look like one left behind by a publisher that exited (killed, say):
    // its recorded process is a reaped child.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = u64::from(child.id());
    child.wait().unwrap();
    publisher
        .segment()
        .control()
        .publisher_pid
        .store(dead, std::sync::atomic::Ordering::Relaxed);
    let timeout = Duration::from_secs(5);
    let started = Instant::now();
    let err = Subscriber::join(&path, "orphaned", timeout, false, &Cancel::never())
        .err()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(err.kind, ErrorKind::PublisherGone, "{err}");
    assert!(
        err.message.contains("worker orphaned")
            && err.message.contains(&format!("process {dead}"))
            && err.message.contains("exited"),
        "{err}"
    );
    let err = announced_plan(&path, "worker planner", timeout, &Cancel::never())
        .err()
        .unwrap();
    assert!(err.message.contains("worker planner"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
}
