//! Two-thread stress tests of the OS-core ⇄ DPI-core queues: millions of items cross the ring
//! and every one must arrive exactly once and in order.

use ally_dpi::queue::{Doorbell, DoorbellWatcher, SpscStorage};

const ITEMS: u64 = 4_000_000;

fn run(batch_push: bool, batch_pop: bool) {
    let mut storage: Box<SpscStorage<u64, 256>> = Box::new(SpscStorage::new());
    let (mut p, mut c) = storage.split().unwrap();
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut next = 0u64;
            let mut buf = [0u64; 37];
            while next < ITEMS {
                if batch_push {
                    let n = (ITEMS - next).min(buf.len() as u64) as usize;
                    for (i, b) in buf[..n].iter_mut().enumerate() {
                        *b = next + i as u64;
                    }
                    next += p.push_slice(&buf[..n]) as u64;
                } else if p.push(next).is_ok() {
                    next += 1;
                }
            }
        });
        let mut expect = 0u64;
        let mut out = [u64::MAX; 29];
        while expect < ITEMS {
            if batch_pop {
                let n = c.pop_into(&mut out);
                for v in &out[..n] {
                    assert_eq!(*v, expect, "lost, duplicated or reordered item");
                    expect += 1;
                }
            } else if let Some(v) = c.pop() {
                assert_eq!(v, expect, "lost, duplicated or reordered item");
                expect += 1;
            }
        }
        // Nothing extra may appear after the last item.
        assert_eq!(c.pop(), None);
    });
}

#[test]
fn queue_stress_single_items() {
    run(false, false);
}

#[test]
fn queue_stress_batches() {
    run(true, true);
}

#[test]
fn queue_stress_mixed() {
    run(true, false);
    run(false, true);
}

/// A doorbell-driven handoff: the producer pushes then rings; the consumer only looks at the
/// ring after a doorbell. No item may be stranded after the last ring.
#[test]
fn queue_stress_doorbell_wakeups() {
    const N: u64 = 1_000_000;
    let mut storage: Box<SpscStorage<u64, 64>> = Box::new(SpscStorage::new());
    let db = Doorbell::new();
    let (mut p, mut c) = storage.split().unwrap();
    std::thread::scope(|s| {
        let db = &db;
        // Created before the producer starts so that no ring predates it.
        let mut w = DoorbellWatcher::new(db);
        s.spawn(move || {
            let mut next = 0;
            while next < N {
                if p.push(next).is_ok() {
                    next += 1;
                    db.ring();
                }
            }
        });
        let mut expect = 0;
        while expect < N {
            if w.poll(db) == 0 {
                std::hint::spin_loop();
                continue;
            }
            while let Some(v) = c.pop() {
                assert_eq!(v, expect);
                expect += 1;
            }
        }
    });
}
