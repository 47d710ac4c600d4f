//! A bounded, lock-free ring of text records (`\n`-terminated lines) from one producer to a
//! UART: the DPI core writes its alert records (EVE lines, dropped-frame excerpts) here and
//! never waits for COM2; whoever holds COM2 moves them out while the UART has room.
//!
//! * A record is whole or absent: the producer publishes it only at its newline; one that
//!   does not fit (ring full, or longer than the record bound) is dropped whole and counted
//!   as lost. Producing never blocks and never fails.
//! * The consumer writes only as many bytes as the transmitter takes without waiting
//!   ([`TxFifo::room`]). A record it has begun stays begun ([`RecordRing::in_record`]): the
//!   port's other writers finish it ([`RecordRing::finish_record`]) before their own line,
//!   so records and log lines never interleave mid-line.
//!
//! Storage is atomic bytes (plain stores on x86): no `unsafe`. Positions are byte counts
//! since the start that only grow; the head/tail release-acquire pairs order the bytes.

use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

/// A transmitter that says how many bytes it takes without waiting (a 16550's FIFO).
pub trait TxFifo {
    /// Bytes that [`TxFifo::put`] may write now without waiting.
    fn room(&mut self) -> usize;
    /// Writes one byte; only called within the room [`TxFifo::room`] reported.
    fn put(&mut self, byte: u8);
}

/// Polls of an unready transmitter after which a blocking drain gives up (a stuck UART must
/// not hang the power-off report; the serial writer gives up the same way).
pub const PATIENCE: u32 = 100_000;

/// The ring's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Records written out whole.
    pub written: u64,
    /// Records dropped because they did not fit.
    pub lost: u64,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Highest fill in bytes.
    pub peak: u64,
    /// Bytes published and not yet written out.
    pub pending: u64,
}

/// `N` bytes (a power of two) of records.
pub struct RecordRing<const N: usize> {
    bytes: [AtomicU8; N],
    /// Bytes published (producer-owned).
    tail: AtomicU64,
    /// Bytes consumed (consumer-owned).
    head: AtomicU64,
    producer_taken: AtomicBool,
    /// Held while a consumer runs: a second one backs off instead of interleaving.
    consuming: AtomicBool,
    /// The consumer wrote part of a record.
    in_record: AtomicBool,
    lost: AtomicU64,
    written: AtomicU64,
    peak: AtomicU64,
}

impl<const N: usize> Default for RecordRing<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> RecordRing<N> {
    const CAPACITY: u64 = {
        assert!(N.is_power_of_two(), "ring size must be a power of two");
        N as u64
    };

    /// An empty ring.
    pub const fn new() -> Self {
        let _ = Self::CAPACITY;
        Self {
            bytes: [const { AtomicU8::new(0) }; N],
            tail: AtomicU64::new(0),
            head: AtomicU64::new(0),
            producer_taken: AtomicBool::new(false),
            consuming: AtomicBool::new(false),
            in_record: AtomicBool::new(false),
            lost: AtomicU64::new(0),
            written: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    /// The ring's one producer, the first time; records longer than `max_record` bytes
    /// (newline included) are dropped.
    pub fn producer(&self, max_record: usize) -> Option<RingProducer<'_, N>> {
        if self.producer_taken.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(RingProducer {
            ring: self,
            pending: 0,
            overflow: false,
            max_record: (max_record as u64).min(Self::CAPACITY),
        })
    }

    fn slot(&self, position: u64) -> &AtomicU8 {
        &self.bytes[(position & (Self::CAPACITY - 1)) as usize]
    }

    /// Whether published bytes wait to be written out (two loads; no lock).
    pub fn has_pending(&self) -> bool {
        self.tail.load(Ordering::Acquire) != self.head.load(Ordering::Relaxed)
    }

    /// Whether a record has been written out in part: nothing else may go to the port until
    /// [`RecordRing::finish_record`] ends it.
    pub fn in_record(&self) -> bool {
        self.in_record.load(Ordering::Relaxed)
    }

    /// The counters.
    pub fn stats(&self) -> RingStats {
        let tail = self.tail.load(Ordering::Acquire);
        RingStats {
            written: self.written.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            capacity: Self::CAPACITY,
            peak: self.peak.load(Ordering::Relaxed),
            pending: tail.saturating_sub(self.head.load(Ordering::Acquire)),
        }
    }

    /// Writes published bytes to `out` while it has room, up to position `end`, stopping
    /// after a record's end when `one_record`. `\n` goes out as `\r\n` (serial consoles),
    /// so it needs two bytes of room. Returns the bytes taken from the ring; 0 when another
    /// consumer is running.
    fn transmit(&self, out: &mut impl TxFifo, end: u64, one_record: bool) -> u64 {
        if self.consuming.swap(true, Ordering::Acquire) {
            return 0;
        }
        let start = self.head.load(Ordering::Relaxed);
        let end = end.min(self.tail.load(Ordering::Acquire));
        let mut head = start;
        let mut room = if head < end { out.room() } else { 0 };
        let mut in_record = self.in_record.load(Ordering::Relaxed);
        while head < end && room > 0 {
            let byte = self.slot(head).load(Ordering::Relaxed);
            if byte == b'\n' {
                if room < 2 {
                    break;
                }
                out.put(b'\r');
                out.put(b'\n');
                room -= 2;
                head += 1;
                in_record = false;
                self.written.fetch_add(1, Ordering::Relaxed);
                if one_record {
                    break;
                }
            } else {
                out.put(byte);
                room -= 1;
                head += 1;
                in_record = true;
            }
        }
        self.in_record.store(in_record, Ordering::Relaxed);
        // Release: the bytes were read before the producer may overwrite them.
        self.head.store(head, Ordering::Release);
        self.consuming.store(false, Ordering::Release);
        head - start
    }

    /// Writes what the transmitter takes now (never waits). Returns the bytes written.
    pub fn pump(&self, out: &mut impl TxFifo) -> u64 {
        self.transmit(out, u64::MAX, false)
    }

    /// Writes the rest of a record begun by [`RecordRing::pump`], waiting for the
    /// transmitter (`wait` between polls). False if it gave up ([`PATIENCE`]).
    pub fn finish_record(&self, out: &mut impl TxFifo, wait: impl FnMut()) -> bool {
        self.drain_blocking(out, u64::MAX, true, wait)
    }

    /// Writes every record published so far, waiting for the transmitter (records the
    /// producer adds meanwhile are left, so a busy producer cannot make this last for ever).
    /// False if it gave up ([`PATIENCE`]).
    pub fn flush(&self, out: &mut impl TxFifo, wait: impl FnMut()) -> bool {
        let end = self.tail.load(Ordering::Acquire);
        self.drain_blocking(out, end, false, wait)
    }

    fn drain_blocking(
        &self,
        out: &mut impl TxFifo,
        end: u64,
        one_record: bool,
        mut wait: impl FnMut(),
    ) -> bool {
        let mut idle = 0;
        loop {
            let done = if one_record {
                !self.in_record()
            } else {
                self.head.load(Ordering::Relaxed) >= end
            };
            if done {
                return true;
            }
            if self.transmit(out, end, one_record) > 0 {
                idle = 0;
            } else {
                idle += 1;
                if idle >= PATIENCE {
                    return false;
                }
                wait();
            }
        }
    }
}

/// The producing end: a `fmt::Write` whose text becomes records at each newline.
pub struct RingProducer<'a, const N: usize> {
    ring: &'a RecordRing<N>,
    /// Bytes of the record being written, stored past the tail but not yet published.
    pending: u64,
    /// The record being written does not fit: it is dropped at its newline.
    overflow: bool,
    max_record: u64,
}

impl<const N: usize> RingProducer<'_, N> {
    /// Appends bytes; each newline ends (publishes or drops) a record. Never blocks.
    pub fn write_bytes(&mut self, mut bytes: &[u8]) {
        while let Some(newline) = bytes.iter().position(|&b| b == b'\n') {
            self.append(&bytes[..=newline]);
            self.end_record();
            bytes = &bytes[newline + 1..];
        }
        self.append(bytes);
    }

    fn append(&mut self, bytes: &[u8]) {
        if self.overflow || bytes.is_empty() {
            return;
        }
        let ring = self.ring;
        let tail = ring.tail.load(Ordering::Relaxed);
        // Acquire: the consumer finished reading the bytes it released.
        let head = ring.head.load(Ordering::Acquire);
        let free = RecordRing::<N>::CAPACITY - (tail - head);
        let len = bytes.len() as u64;
        if self.pending + len > free.min(self.max_record) {
            self.overflow = true;
            return;
        }
        let start = tail + self.pending;
        for (position, &byte) in (start..).zip(bytes) {
            ring.slot(position).store(byte, Ordering::Relaxed);
        }
        self.pending += len;
    }

    fn end_record(&mut self) {
        let ring = self.ring;
        if self.overflow {
            ring.lost.fetch_add(1, Ordering::Relaxed);
        } else {
            let tail = ring.tail.load(Ordering::Relaxed) + self.pending;
            // Release: the record's bytes are visible before its end is.
            ring.tail.store(tail, Ordering::Release);
            let fill = tail - ring.head.load(Ordering::Relaxed);
            // Only the producer writes the peak: no read-modify-write needed.
            if fill > ring.peak.load(Ordering::Relaxed) {
                ring.peak.store(fill, Ordering::Relaxed);
            }
        }
        self.pending = 0;
        self.overflow = false;
    }
}

impl<const N: usize> fmt::Write for RingProducer<'_, N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write;
    use std::string::String;
    use std::vec::Vec;

    /// A transmitter that takes `room` bytes per poll, then `stall` polls of nothing.
    #[derive(Default)]
    struct Fifo {
        out: Vec<u8>,
        room: usize,
        polls: usize,
        stall_every: usize,
    }

    impl Fifo {
        fn new(room: usize) -> Self {
            Fifo {
                room,
                ..Default::default()
            }
        }
        fn text(&self) -> String {
            String::from_utf8(self.out.clone())
                .unwrap()
                .replace("\r\n", "\n")
        }
    }

    impl TxFifo for Fifo {
        fn room(&mut self) -> usize {
            self.polls += 1;
            if self.stall_every > 0 && self.polls.is_multiple_of(self.stall_every) {
                0
            } else {
                self.room
            }
        }
        fn put(&mut self, byte: u8) {
            self.out.push(byte);
        }
    }

    #[test]
    fn records_go_out_whole_with_crlf() {
        let ring = RecordRing::<64>::new();
        let mut p = ring.producer(64).unwrap();
        write!(p, "ab").unwrap();
        assert!(
            !ring.has_pending(),
            "nothing is published before the newline"
        );
        writeln!(p, "c").unwrap();
        p.write_bytes(b"x\ny\n");
        let mut fifo = Fifo::new(16);
        ring.pump(&mut fifo);
        assert_eq!(fifo.out, b"abc\r\nx\r\ny\r\n");
        let s = ring.stats();
        assert_eq!((s.written, s.lost, s.capacity, s.pending), (3, 0, 64, 0));
        assert_eq!(s.peak, 8);
    }

    #[test]
    fn only_one_producer() {
        let ring = RecordRing::<16>::new();
        let _p = ring.producer(16).unwrap();
        assert!(ring.producer(16).is_none());
    }

    #[test]
    fn wraps_around_many_times() {
        let ring = RecordRing::<32>::new();
        let mut p = ring.producer(32).unwrap();
        let mut fifo = Fifo::new(5);
        let mut expected = String::new();
        for i in 0..500 {
            let line = format!("record {i}\n");
            p.write_str(&line).unwrap();
            expected.push_str(&line);
            while ring.has_pending() {
                ring.pump(&mut fifo);
            }
        }
        assert_eq!(fifo.text(), expected);
        assert_eq!(ring.stats().written, 500);
        assert_eq!(ring.stats().lost, 0);
    }

    #[test]
    fn a_full_ring_drops_whole_records_and_counts_them() {
        let ring = RecordRing::<16>::new();
        let mut p = ring.producer(16).unwrap();
        p.write_bytes(b"0123456\n"); // 8 bytes
        p.write_bytes(b"abcdef\n"); // 7: fits (15 of 16)
        p.write_bytes(b"too long\n"); // does not fit: lost
        p.write_bytes(b"\n"); // 1 byte: fits (16 of 16)
        let s = ring.stats();
        assert_eq!((s.lost, s.peak, s.pending), (1, 16, 16));
        // Part of the first record goes out; the rest frees space only once consumed.
        let mut fifo = Fifo::new(4);
        ring.pump(&mut fifo);
        assert!(ring.in_record());
        p.write_bytes(b"wxyz\n"); // 5 bytes, 4 free: lost
        p.write_bytes(b"w"); // a record written in pieces...
        ring.pump(&mut fifo);
        ring.pump(&mut fifo);
        p.write_bytes(b"xy\n"); // ...fits now
        while ring.has_pending() {
            ring.pump(&mut fifo);
        }
        assert_eq!(fifo.text(), "0123456\nabcdef\n\nwxy\n");
        let s = ring.stats();
        assert_eq!((s.written, s.lost), (4, 2));
    }

    #[test]
    fn records_over_the_bound_are_lost_and_the_next_one_is_intact() {
        let ring = RecordRing::<64>::new();
        let mut p = ring.producer(8).unwrap();
        p.write_bytes(b"1234");
        p.write_bytes(b"5678");
        p.write_bytes(b"9\nok\n");
        let mut fifo = Fifo::new(64);
        ring.pump(&mut fifo);
        assert_eq!(fifo.text(), "ok\n");
        assert_eq!(ring.stats().lost, 1);
    }

    #[test]
    fn a_newline_waits_for_two_bytes_of_room() {
        let ring = RecordRing::<16>::new();
        let mut p = ring.producer(16).unwrap();
        p.write_bytes(b"a\n");
        let mut fifo = Fifo::new(2);
        // Room for "a" and one more byte: the CR LF pair waits.
        assert_eq!(ring.pump(&mut fifo), 1);
        assert!(ring.in_record());
        assert_eq!(ring.pump(&mut fifo), 1);
        assert_eq!(fifo.out, b"a\r\n");
        assert!(!ring.in_record());
    }

    #[test]
    fn pump_never_waits_and_finish_record_ends_the_line() {
        let ring = RecordRing::<64>::new();
        let mut p = ring.producer(64).unwrap();
        p.write_bytes(b"first record\nsecond\n");
        let mut fifo = Fifo::new(4);
        fifo.stall_every = 2;
        assert_eq!(ring.pump(&mut fifo), 4);
        assert_eq!(ring.pump(&mut fifo), 0, "no room: returns at once");
        let mut waits = 0;
        assert!(ring.finish_record(&mut fifo, || waits += 1));
        assert_eq!(fifo.text(), "first record\n");
        assert!(waits > 0);
        assert!(!ring.in_record());
        assert!(ring.has_pending(), "the next record is left for the pump");
    }

    #[test]
    fn flush_writes_what_was_published_at_the_call() {
        let ring = RecordRing::<64>::new();
        let mut p = ring.producer(64).unwrap();
        p.write_bytes(b"one\ntwo\n");
        let mut fifo = Fifo::new(3);
        let mut produced = false;
        assert!(ring.flush(&mut fifo, || {}));
        p.write_bytes(b"three\n");
        assert_eq!(fifo.text(), "one\ntwo\n");
        assert!(ring.flush(&mut fifo, || produced = true));
        assert_eq!(fifo.text(), "one\ntwo\nthree\n");
        assert!(!produced, "the FIFO always had room");
    }

    #[test]
    fn a_stuck_transmitter_makes_blocking_drains_give_up() {
        let ring = RecordRing::<16>::new();
        let mut p = ring.producer(16).unwrap();
        p.write_bytes(b"abc\n");
        let mut stuck = Fifo::new(0);
        assert!(!ring.flush(&mut stuck, || {}));
        assert!(stuck.out.is_empty());
        assert_eq!(ring.stats().pending, 4);
    }

    #[test]
    fn a_second_consumer_backs_off() {
        let ring = RecordRing::<16>::new();
        let mut p = ring.producer(16).unwrap();
        p.write_bytes(b"abc\n");
        ring.consuming.store(true, Ordering::Relaxed);
        assert_eq!(ring.pump(&mut Fifo::new(16)), 0);
        ring.consuming.store(false, Ordering::Relaxed);
        assert_eq!(ring.pump(&mut Fifo::new(16)), 4);
    }

    #[test]
    fn concurrent_producer_and_consumer_keep_records_whole_and_in_order() {
        const RECORDS: u64 = 200_000;
        let ring: &'static RecordRing<256> = Box::leak(Box::new(RecordRing::new()));
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let producer = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut p = ring.producer(64).unwrap();
                for i in 0..RECORDS {
                    // Variable lengths, written in two pieces.
                    write!(p, "rec {i} ").unwrap();
                    writeln!(p, "{}", "x".repeat((i % 23) as usize)).unwrap();
                }
                done.store(true, Ordering::Release);
            })
        };
        let mut fifo = Fifo::new(16);
        loop {
            let finished = done.load(Ordering::Acquire);
            ring.pump(&mut fifo);
            if finished && !ring.has_pending() {
                break;
            }
        }
        producer.join().unwrap();
        let text = fifo.text();
        let mut last = None;
        let mut lines = 0;
        for line in text.lines() {
            let (i, xs) = line
                .strip_prefix("rec ")
                .and_then(|r| r.split_once(' '))
                .unwrap_or_else(|| panic!("torn record {line:?}"));
            let i: u64 = i.parse().unwrap();
            assert_eq!(xs, "x".repeat((i % 23) as usize), "torn record {line:?}");
            assert!(last.is_none_or(|l| l < i), "out of order at {i}");
            last = Some(i);
            lines += 1;
        }
        let s = ring.stats();
        assert_eq!(s.written, lines);
        assert_eq!(s.written + s.lost, RECORDS);
        assert!(s.peak <= 256);
        assert!(text.ends_with('\n'));
    }
}
