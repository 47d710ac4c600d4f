#!/usr/bin/env python3
"""Writes seed inputs for the emulate_mmio fuzz target into corpus/emulate_mmio/: guests
whose RIP holds a supported MOV whose operand is the faulting address, in real mode and in
64-bit mode with 4-level paging, so that the fuzzer starts from inputs that emulate. The
layout is that of `check_emulation_invariants` (hypervisor/src/guest/testing.rs)."""
import os
import struct

HEADER_LEN = 192
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "emulate_mmio")


def header(mode, flags, cr3, rip, regs, access, gpa, small=0xFFFF):
    h = struct.pack("<BBHB", mode, flags, cr3, 52)
    h += struct.pack("<QI", rip, 0)  # rip, cs base
    h += struct.pack("<HHIQQ", 0, 0, 0, 0, 0)  # es ss ds fs gs bases
    h += struct.pack("<H", small)
    h += b"".join(struct.pack("<Q", r) for r in regs)
    h += struct.pack("<BIQQ", access, gpa, 0x1122334455667788, rip)
    assert len(h) == HEADER_LEN, len(h)
    return h


def real_mode(code, store, v=0x7000):
    pages = bytearray(0x1000)
    pages[0x100:0x100 + len(code)] = code
    return header(0, 0, 0, 0x100, [v] * 16, 1 if store else 0, v) + bytes(pages)


def long_mode(code, store):
    # PML4 page 1 → PDPT page 2 → PD page 3 → PT page 4; code page 5 at linear 0,
    # MMIO (gpa 0x7000, page 7) at linear 0x1000.
    pages = bytearray(7 * 0x1000)

    def entry(page, index, value):
        struct.pack_into("<Q", pages, page * 0x1000 + index * 8, value)

    entry(1, 0, 0x2000 | 3)
    entry(2, 0, 0x3000 | 3)
    entry(3, 0, 0x4000 | 3)
    entry(4, 0, 0x5000 | 3)
    entry(4, 1, 0x7000 | 3)
    pages[0x5000:0x5000 + len(code)] = code
    mode = 4 + 6 * 2  # 4-level paging, CS.L
    return header(mode, 1, 0x1000, 0, [0x1008] * 16, 1 if store else 0, 0x7008, small=0) + bytes(pages)


def paged(kind, code, store):
    """32-bit paging, PAE or 5-level: code at linear 0, MMIO (gpa 0x7000) at linear 0x1000."""
    pages = bytearray(7 * 0x1000)

    def entry(page, index, value, size=8):
        struct.pack_into("<I" if size == 4 else "<Q", pages, page * 0x1000 + index * size, value)

    if kind == "32bit":
        entry(1, 0, 0x2000 | 3, 4)
        entry(2, 0, 0x5000 | 3, 4)
        entry(2, 1, 0x7000 | 3, 4)
        mode = 2 + 6 * 1  # 32-bit paging, CS.D
    elif kind == "pae":
        entry(1, 0, 0x2000 | 1)  # PAE PDPTEs have no R/W
        entry(2, 0, 0x3000 | 3)
        entry(3, 0, 0x5000 | 3)
        entry(3, 1, 0x7000 | 3)
        mode = 3 + 6 * 1  # PAE, CS.D
    else:
        for table in range(1, 5):
            entry(table, 0, ((table + 1) * 0x1000) | 3)
        entry(5, 0, 0x6000 | 3)
        entry(5, 1, 0x7000 | 3)
        pages[0x6000:0x6000 + len(code)] = code
        mode = 5 + 6 * 2  # 5-level, CS.L
    if kind != "5level":
        pages[0x5000:0x5000 + len(code)] = code
    return header(mode, 1, 0x1000, 0, [0x1008] * 16, 1 if store else 0, 0x7008, small=0) + bytes(pages)


SEEDS = {
    "p32_mov_store": paged("32bit", b"\x89\x07", True),
    "pae_mov_load": paged("pae", b"\x8b\x07", False),
    "pae_movzx": paged("pae", b"\x0f\xb7\x07", False),
    "la57_mov_store": paged("5level", b"\x89\x07", True),
    "la57_movsx": paged("5level", b"\x48\x0f\xbe\x07", False),
    "rm_mov_store": real_mode(b"\x89\x07", True),
    "rm_mov_load": real_mode(b"\x8b\x05", False),
    "rm_movzx": real_mode(b"\x66\x0f\xb6\x04", False),
    "rm_imm": real_mode(b"\xc6\x07\x5a", True),
    "rm_moffs": real_mode(b"\xa1\x00\x70", False),
    "lm_mov_store": long_mode(b"\x89\x07", True),
    "lm_mov_load_rex": long_mode(b"\x4c\x8b\x3b", False),
    "lm_movsxd": long_mode(b"\x48\x63\x13", False),
    "lm_imm64": long_mode(b"\x48\xc7\x03\xfe\xff\xff\xff", True),
    "lm_sib": long_mode(b"\x47\x8b\x4c\x9a\x00", False),
}

os.makedirs(OUT, exist_ok=True)
for name, data in SEEDS.items():
    with open(os.path.join(OUT, "seed_" + name), "wb") as f:
        f.write(data)
print(f"{len(SEEDS)} seeds in {OUT}")
