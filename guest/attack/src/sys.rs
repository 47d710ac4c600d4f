//! Thin wrappers over the Linux calls the attacks need: I/O privilege, CPU pinning, physical
//! memory maps (/dev/mem, a PCI BAR's sysfs resource file), /dev/cpu/N/msr, /proc/self/pagemap.

use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

/// A failed system call: what was attempted and the errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysError {
    pub what: String,
    pub errno: i32,
}

impl SysError {
    fn last(what: impl Into<String>) -> SysError {
        SysError {
            what: what.into(),
            errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        }
    }

    fn io(what: impl Into<String>, e: &std::io::Error) -> SysError {
        SysError {
            what: what.into(),
            errno: e.raw_os_error().unwrap_or(0),
        }
    }
}

impl fmt::Display for SysError {
    /// `what:ERRNO` as one marker word.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            self.what.replace(' ', "_"),
            errno_name(self.errno)
        )
    }
}

/// The symbolic name of the errnos the attacks meet (`errnoN` otherwise).
pub fn errno_name(errno: i32) -> String {
    match errno {
        libc::EPERM => "EPERM".into(),
        libc::ENOENT => "ENOENT".into(),
        libc::EIO => "EIO".into(),
        libc::ENXIO => "ENXIO".into(),
        libc::EBADF => "EBADF".into(),
        libc::EAGAIN => "EAGAIN".into(),
        libc::ENOMEM => "ENOMEM".into(),
        libc::EACCES => "EACCES".into(),
        libc::EFAULT => "EFAULT".into(),
        libc::EBUSY => "EBUSY".into(),
        libc::ENODEV => "ENODEV".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::ENOSYS => "ENOSYS".into(),
        libc::ENOBUFS => "ENOBUFS".into(),
        libc::ENETUNREACH => "ENETUNREACH".into(),
        n => format!("errno{n}"),
    }
}

/// I/O privilege level 3 for the calling thread (every port; needed above 0x3FF).
pub fn iopl3() -> Result<(), SysError> {
    // SAFETY: iopl only changes this thread's I/O permission; no memory is involved.
    if unsafe { libc::iopl(3) } == 0 {
        Ok(())
    } else {
        Err(SysError::last("iopl"))
    }
}

/// Access to ports `from..from + count` for the calling thread (ports below 0x400 only).
pub fn ioperm(from: u16, count: u16) -> Result<(), SysError> {
    // SAFETY: ioperm only changes this thread's I/O bitmap; no memory is involved.
    if unsafe { libc::ioperm(from.into(), count.into(), 1) } == 0 {
        Ok(())
    } else {
        Err(SysError::last(format!("ioperm_{from:#x}")))
    }
}

/// Port access for `from..from + count`: ioperm when it reaches, else iopl(3).
pub fn port_access(from: u16, count: u16) -> Result<(), SysError> {
    if u32::from(from) + u32::from(count) <= 0x400 {
        ioperm(from, count)
    } else {
        iopl3()
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> Result<(), SysError> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes a bit of `set`, which we own; `cpu` is checked by the kernel.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(SysError::last(format!("pin_cpu{cpu}")))
    }
}

/// The number of CPUs online (/sys/devices/system/cpu/online, e.g. `0-2` or `0`).
pub fn online_cpus() -> Vec<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    parse_cpu_list(text.trim())
}

/// Parses a kernel CPU list (`0-2,4`).
pub fn parse_cpu_list(s: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    out.extend(a..=b);
                }
            }
            None => out.extend(part.parse::<usize>().ok()),
        }
    }
    out
}

/// A shared mapping of physical memory or MMIO (a file offset of /dev/mem or of a sysfs
/// `resourceN`), accessed with volatile 32-bit loads and stores.
#[derive(Debug)]
pub struct PhysMap {
    base: NonNull<u8>,
    len: usize,
}

impl PhysMap {
    /// Maps `len` bytes of `path` at `offset` (page-aligned) read-write.
    pub fn open(path: &str, offset: u64, len: usize) -> Result<PhysMap, SysError> {
        let c = CString::new(path).map_err(|_| SysError {
            what: format!("open_{path}"),
            errno: libc::EINVAL,
        })?;
        // SAFETY: `c` is a valid NUL-terminated path.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_SYNC) };
        if fd < 0 {
            return Err(SysError::last(format!("open_{path}")));
        }
        let Ok(off) = libc::off_t::try_from(offset) else {
            // SAFETY: `fd` was opened above and is closed once.
            unsafe { libc::close(fd) };
            return Err(SysError {
                what: format!("offset_{offset:#x}"),
                errno: libc::EINVAL,
            });
        };
        // SAFETY: a fresh shared mapping chosen by the kernel; `fd` is open.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                off,
            )
        };
        let err = SysError::last(format!("mmap_{path}@{offset:#x}"));
        // SAFETY: `fd` was opened above and is closed once; the mapping outlives it.
        unsafe { libc::close(fd) };
        if p == libc::MAP_FAILED {
            return Err(err);
        }
        NonNull::new(p.cast::<u8>())
            .map(|base| PhysMap { base, len })
            .ok_or(err)
    }

    fn at(&self, offset: usize) -> *mut u32 {
        assert!(
            offset.is_multiple_of(4) && offset + 4 <= self.len,
            "offset {offset:#x} outside the map"
        );
        // SAFETY: `offset + 4 <= len`: inside the mapping.
        unsafe { self.base.as_ptr().add(offset).cast::<u32>() }
    }

    /// An aligned dword load at `offset`: one MOV, as a driver's `readl` (LLVM may fuse a
    /// volatile load and store into one read-modify-write instruction, which no driver
    /// issues to device registers and which Ally's MMIO emulation stops the guest for).
    pub fn read32(&self, offset: usize) -> u32 {
        let value: u32;
        // SAFETY: `at` checks alignment and bounds; the mapping is live while `self` is.
        unsafe {
            core::arch::asm!("mov {0:e}, dword ptr [{1}]", out(reg) value, in(reg) self.at(offset), options(nostack, preserves_flags));
        }
        value
    }

    /// A volatile byte store at `offset`.
    pub fn write8(&self, offset: usize, value: u8) {
        assert!(offset < self.len, "offset {offset:#x} outside the map");
        // SAFETY: inside the live mapping.
        unsafe { self.base.as_ptr().add(offset).write_volatile(value) }
    }

    /// An aligned dword store at `offset`: one MOV, as a driver's `writel`.
    pub fn write32(&self, offset: usize, value: u32) {
        // SAFETY: `at` checks alignment and bounds; the mapping is live while `self` is.
        unsafe {
            core::arch::asm!("mov dword ptr [{0}], {1:e}", in(reg) self.at(offset), in(reg) value, options(nostack, preserves_flags));
        }
    }
}

impl Drop for PhysMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `open` made; no reference into it survives.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// /dev/cpu/N/msr (needs msr.ko): 8-byte reads and writes at offset = MSR index.
#[derive(Debug)]
pub struct MsrDev {
    file: File,
}

impl MsrDev {
    pub fn open(cpu: usize) -> Result<MsrDev, SysError> {
        let path = format!("/dev/cpu/{cpu}/msr");
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map(|file| MsrDev { file })
            .map_err(|e| SysError::io(format!("open_{path}"), &e))
    }

    /// RDMSR; EIO means the CPU raised #GP.
    pub fn read(&self, msr: u32) -> Result<u64, SysError> {
        let mut b = [0u8; 8];
        self.file
            .read_exact_at(&mut b, msr.into())
            .map(|()| u64::from_le_bytes(b))
            .map_err(|e| SysError::io("rdmsr", &e))
    }

    /// WRMSR; EIO means the CPU raised #GP.
    pub fn write(&self, msr: u32, value: u64) -> Result<(), SysError> {
        self.file
            .write_all_at(&value.to_le_bytes(), msr.into())
            .map_err(|e| SysError::io("wrmsr", &e))
    }
}

/// A page of locked anonymous memory and its physical address (for DMA by the NIC).
#[derive(Debug)]
pub struct DmaPage {
    base: NonNull<u8>,
    pub phys: u64,
}

pub const PAGE: usize = 4096;

impl DmaPage {
    pub fn new() -> Result<DmaPage, SysError> {
        // SAFETY: a fresh private anonymous mapping chosen by the kernel.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_LOCKED | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(SysError::last("mmap_dma_page"));
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or(SysError {
            what: "mmap_dma_page".into(),
            errno: libc::ENOMEM,
        })?;
        let mut page = DmaPage { base, phys: 0 };
        // SAFETY: the page is mapped, writable and PAGE bytes long.
        if unsafe { libc::mlock(p, PAGE) } != 0 {
            return Err(SysError::last("mlock"));
        }
        page.bytes().fill(0);
        // Set in place: `DmaPage { phys, ..page }` would copy the fields and then drop `page`,
        // unmapping the page the new value points at.
        page.phys = virt_to_phys(base.as_ptr() as u64)?;
        Ok(page)
    }

    /// The page's bytes. The NIC may write them (descriptor write-back): read them volatile
    /// through [`DmaPage::read_volatile_u8`] when waiting for it.
    #[allow(clippy::mut_from_ref)]
    pub fn bytes(&self) -> &mut [u8] {
        // SAFETY: the mapping is PAGE bytes, live while `self` is; the attack is single-threaded
        // and takes no two slices at once.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), PAGE) }
    }

    pub fn read_volatile_u8(&self, offset: usize) -> u8 {
        assert!(offset < PAGE);
        // SAFETY: inside the live mapping.
        unsafe { self.base.as_ptr().add(offset).read_volatile() }
    }

    /// `len` bytes at `offset`, each read volatile (a device wrote them by DMA).
    pub fn read_volatile(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(
            offset + len <= PAGE,
            "{offset:#x}+{len:#x} outside the page"
        );
        (offset..offset + len)
            .map(|i| self.read_volatile_u8(i))
            .collect()
    }
}

impl Drop for DmaPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the page `new` mapped; no reference into it survives.
        unsafe { libc::munmap(self.base.as_ptr().cast(), PAGE) };
    }
}

/// The physical address of a resident virtual address, from /proc/self/pagemap (bits 0-54:
/// PFN, bit 63: present; root sees the PFN).
pub fn virt_to_phys(virt: u64) -> Result<u64, SysError> {
    let f = File::open("/proc/self/pagemap").map_err(|e| SysError::io("open_pagemap", &e))?;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, (virt / PAGE as u64) * 8)
        .map_err(|e| SysError::io("read_pagemap", &e))?;
    pagemap_phys(u64::from_le_bytes(b), virt).ok_or(SysError {
        what: "pagemap_no_pfn".into(),
        errno: libc::EPERM,
    })
}

/// The physical address from a pagemap entry, `None` when not present or the PFN is hidden.
pub fn pagemap_phys(entry: u64, virt: u64) -> Option<u64> {
    let pfn = entry & ((1 << 55) - 1);
    (entry >> 63 == 1 && pfn != 0).then_some(pfn * PAGE as u64 + virt % PAGE as u64)
}

/// A small sysfs/proc file's text, trimmed.
pub fn read_text(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Reads a little-endian dword of a file at `offset` (sysfs PCI `config`).
pub fn pread_u32(path: &str, offset: u64) -> Result<u32, SysError> {
    let f = File::open(path).map_err(|e| SysError::io(format!("open_{path}"), &e))?;
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, offset)
        .map(|()| u32::from_le_bytes(b))
        .map_err(|e| SysError::io(format!("pread_{path}"), &e))
}

/// Writes a little-endian value of `bytes.len()` bytes at `offset` (sysfs PCI `config`).
pub fn pwrite(path: &str, offset: u64, bytes: &[u8]) -> Result<(), SysError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| SysError::io(format!("open_{path}"), &e))?;
    f.write_all_at(bytes, offset)
        .map_err(|e| SysError::io(format!("pwrite_{path}"), &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0"), [0]);
        assert_eq!(parse_cpu_list("0-2"), [0, 1, 2]);
        assert_eq!(parse_cpu_list("0,2-3"), [0, 2, 3]);
        assert!(parse_cpu_list("").is_empty());
    }

    #[test]
    fn a_dma_page_stays_mapped_after_new() {
        // Without the PFN (no CAP_SYS_ADMIN) there is no page to test.
        if let Ok(page) = DmaPage::new() {
            page.bytes()[512] = 0xa5;
            assert_eq!(page.read_volatile_u8(512), 0xa5);
            assert_ne!(page.phys, 0);
        }
    }

    #[test]
    fn pagemap_entries() {
        assert_eq!(
            pagemap_phys((1 << 63) | 0x1234, 0x7000_0abc),
            Some(0x1234abc)
        );
        // Not present, or the PFN hidden (non-root reads zero).
        assert_eq!(pagemap_phys(0x1234, 0x1000), None);
        assert_eq!(pagemap_phys(1 << 63, 0x1000), None);
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(libc::EIO), "EIO");
        assert_eq!(errno_name(9999), "errno9999");
        let e = SysError {
            what: "open /dev/mem".into(),
            errno: libc::EACCES,
        };
        assert_eq!(e.to_string(), "open_/dev/mem:EACCES");
    }
}
