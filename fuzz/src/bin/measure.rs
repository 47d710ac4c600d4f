//! Prints the figures Ally's MMIO path costs on the host (not a pass/fail test):
//! - heap that iced-x86's lazily built decoder tables take (what `guest::warm_up` allocates);
//! - time per `decode_mmio` and per `emulate_mmio` of the e1000 TDT write
//!   `mov [rdi+0x3818], eax` in a 64-bit guest with 4-level paging, with the sparse test
//!   memory and with flat guest RAM.
//!
//! Run: `cd fuzz && cargo run --release --bin measure`

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ally_hypervisor::addr::GuestPhysAddr;
use ally_hypervisor::guest::state::bits::*;
use ally_hypervisor::guest::testing::{FakeGuestMemory, RecordingMmio};
use ally_hypervisor::guest::{
    decode_mmio, emulate_mmio, fetch_instruction, translate, warm_up, AccessKind, CpuMode,
    GuestCpuState, GuestMemError, GuestMemory,
};

/// Guest RAM as one flat buffer at guest-physical 0, as Ally's identity map gives it: the
/// realistic cost of a paging-entry read (FakeGuestMemory searches its pages).
struct FlatMemory(Vec<u8>);

impl GuestMemory for FlatMemory {
    fn read(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), GuestMemError> {
        let err = GuestMemError::NotGuestRam {
            gpa,
            len: buf.len(),
        };
        let start = usize::try_from(gpa.0).map_err(|_| err)?;
        let src = self.0.get(start..start + buf.len()).ok_or(err)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write(&mut self, gpa: GuestPhysAddr, buf: &[u8]) -> Result<(), GuestMemError> {
        let err = GuestMemError::NotGuestRam {
            gpa,
            len: buf.len(),
        };
        let start = usize::try_from(gpa.0).map_err(|_| err)?;
        self.0
            .get_mut(start..start + buf.len())
            .ok_or(err)?
            .copy_from_slice(buf);
        Ok(())
    }
}

struct Counting;
static BYTES: AtomicUsize = AtomicUsize::new(0);
static COUNT: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        COUNT.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn main() {
    let (b0, c0) = (BYTES.load(Ordering::Relaxed), COUNT.load(Ordering::Relaxed));
    warm_up();
    let (b1, c1) = (BYTES.load(Ordering::Relaxed), COUNT.load(Ordering::Relaxed));
    println!(
        "iced-x86 decoder tables: {} bytes live in {} allocations after warm_up()",
        b1 - b0,
        c1 - c0
    );

    // 64-bit guest: PML4 at 0x1000 → PDPT 0x2000 → PD 0x3000 → PT 0x4000.
    let mut mem = Box::new(FakeGuestMemory::<8>::new());
    let code_la: u64 = 0x40_0000;
    let mmio_la: u64 = 0x60_0000;
    let mmio_gpa: u64 = 0xfebc_0000;
    let e = |a: u64| a | 0x3;
    mem.load_u64(GuestPhysAddr(0x1000), e(0x2000)).unwrap();
    mem.load_u64(GuestPhysAddr(0x2000), e(0x3000)).unwrap();
    mem.load_u64(GuestPhysAddr(0x3000 + 2 * 8), e(0x4000))
        .unwrap();
    mem.load_u64(GuestPhysAddr(0x3000 + 3 * 8), e(0x5000))
        .unwrap();
    mem.load_u64(GuestPhysAddr(0x4000), e(0x8000)).unwrap();
    // rdi + 0x3818 is on the fourth page of the BAR.
    mem.load_u64(GuestPhysAddr(0x5000 + 3 * 8), e(mmio_gpa + 0x3000))
        .unwrap();
    let code = [0x89, 0x87, 0x18, 0x38, 0x00, 0x00];
    mem.load(GuestPhysAddr(0x8000), &code).unwrap();
    let cpu = GuestCpuState {
        cr0: CR0_PE | CR0_PG | CR0_WP,
        cr3: 0x1000,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA,
        cs_access_rights: AR_L | 0x9b,
        rip: code_la,
        ..Default::default()
    };
    let mut base = cpu;
    base.regs.rdi = mmio_la;

    let mut flat = FlatMemory(vec![0; 0x9000]);
    let mut page = [0u8; 4096];
    for pfn in [1u64, 2, 3, 4, 5, 8] {
        mem.read(GuestPhysAddr(pfn * 4096), &mut page).unwrap();
        flat.write(GuestPhysAddr(pfn * 4096), &page).unwrap();
    }

    const N: u32 = 1_000_000;
    let (b1, c1) = (BYTES.load(Ordering::Relaxed), COUNT.load(Ordering::Relaxed));
    let t = Instant::now();
    for _ in 0..N {
        black_box(decode_mmio(black_box(&code), CpuMode::Bits64, code_la).unwrap());
    }
    let decode_ns = t.elapsed().as_nanos() as f64 / f64::from(N);

    let t = Instant::now();
    for _ in 0..N {
        black_box(translate(&base, black_box(mmio_la + 0x3818), AccessKind::Write, &*mem).unwrap());
    }
    let walk_ns = t.elapsed().as_nanos() as f64 / f64::from(N);

    let t = Instant::now();
    for _ in 0..N {
        black_box(fetch_instruction(black_box(&base), &*mem).unwrap());
    }
    let fetch_ns = t.elapsed().as_nanos() as f64 / f64::from(N);

    let t = Instant::now();
    for _ in 0..N {
        let mut c = base;
        let mut dev = RecordingMmio::new(0);
        let a = emulate_mmio(
            &mut c,
            GuestPhysAddr(mmio_gpa + 0x3818),
            AccessKind::Write,
            &*mem,
            &mut dev,
        )
        .unwrap();
        black_box(a);
    }
    let emulate_ns = t.elapsed().as_nanos() as f64 / f64::from(N);

    let t = Instant::now();
    for _ in 0..N {
        let mut c = base;
        let mut dev = RecordingMmio::new(0);
        let a = emulate_mmio(
            &mut c,
            GuestPhysAddr(mmio_gpa + 0x3818),
            AccessKind::Write,
            &flat,
            &mut dev,
        )
        .unwrap();
        black_box(a);
    }
    let emulate_flat_ns = t.elapsed().as_nanos() as f64 / f64::from(N);
    let (b2, c2) = (BYTES.load(Ordering::Relaxed), COUNT.load(Ordering::Relaxed));
    println!("decode_mmio(mov [rdi+0x3818], eax): {decode_ns:.0} ns");
    println!("translate (4-level walk, fake memory): {walk_ns:.0} ns");
    println!("fetch_instruction (walk + 15-byte read): {fetch_ns:.0} ns");
    println!(
        "emulate_mmio (fetch via 4-level walk, decode, operand walk, device write): \
         {emulate_ns:.0} ns"
    );
    println!("emulate_mmio with flat (identity-mapped) guest RAM: {emulate_flat_ns:.0} ns");
    println!(
        "heap allocations during {N} decodes + {N} emulations: {} ({} bytes)",
        c2 - c1,
        b2 - b1
    );
}
