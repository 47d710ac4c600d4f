//! A minimal writer for the cpio "newc" format the Linux kernel unpacks as an initramfs
//! (Documentation/driver-api/early-userspace/buffer-format.rst).

use std::fmt;

/// An error building an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpioError {
    /// A path is empty, absolute, or has `..` or empty components.
    BadPath(String),
    /// A field does not fit the format's 8 hex digits.
    TooLarge { path: String, size: usize },
}

impl fmt::Display for CpioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpioError::BadPath(p) => write!(
                f,
                "initramfs path `{p}` must be relative, non-empty and free of `..`"
            ),
            CpioError::TooLarge { path, size } => {
                write!(
                    f,
                    "initramfs file `{path}` is {size} bytes, over cpio's 4 GiB limit"
                )
            }
        }
    }
}

impl std::error::Error for CpioError {}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// Builds a newc archive in memory. Entries are written in the order added; parents must be
/// added before their children.
#[derive(Debug, Default)]
pub struct CpioWriter {
    out: Vec<u8>,
    next_ino: u32,
}

impl CpioWriter {
    pub fn new() -> CpioWriter {
        CpioWriter {
            out: Vec::new(),
            next_ino: 1,
        }
    }

    fn check_path(path: &str) -> Result<(), CpioError> {
        if path.is_empty()
            || path.starts_with('/')
            || path.split('/').any(|c| c.is_empty() || c == "..")
        {
            return Err(CpioError::BadPath(path.to_string()));
        }
        Ok(())
    }

    fn entry(&mut self, path: &str, mode: u32, nlink: u32, data: &[u8]) -> Result<(), CpioError> {
        let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge {
            path: path.to_string(),
            size: data.len(),
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(path, ino, mode, nlink, size);
        self.out.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    fn header(&mut self, path: &str, ino: u32, mode: u32, nlink: u32, size: u32) {
        // namesize counts the terminating NUL.
        let namesize = path.len() as u32 + 1;
        let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, namesize, 0];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(path.as_bytes());
        self.out.push(0);
        self.pad();
    }

    /// Header and data are each padded to a multiple of 4 bytes.
    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub fn dir(&mut self, path: &str) -> Result<(), CpioError> {
        Self::check_path(path)?;
        self.entry(path, S_IFDIR | 0o755, 2, &[])
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), CpioError> {
        Self::check_path(path)?;
        self.entry(path, S_IFREG | (mode & 0o7777), 1, data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        Self::check_path(path)?;
        self.entry(path, S_IFLNK | 0o777, 1, target.as_bytes())
    }

    /// Appends the trailer and returns the archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.header("TRAILER!!!", 0, 0, 1, 0);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a newc archive back into (name, mode, data) triples.
    fn parse(mut a: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let total = a.len();
        loop {
            let off = total - a.len();
            assert!(off.is_multiple_of(4));
            assert_eq!(&a[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&a[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let mode = field(1);
            let size = field(6) as usize;
            let namesize = field(11) as usize;
            let name = std::str::from_utf8(&a[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(a[110 + namesize - 1], 0);
            let data_at = (110 + namesize).div_ceil(4) * 4;
            let data = a[data_at..data_at + size].to_vec();
            let next = (data_at + size).div_ceil(4) * 4;
            if name == "TRAILER!!!" {
                assert_eq!(next, a.len());
                return out;
            }
            out.push((name, mode, data));
            a = &a[next..];
        }
    }

    #[test]
    fn round_trip() {
        let mut w = CpioWriter::new();
        w.dir("bin").unwrap();
        w.file("bin/busybox", 0o755, b"\x7fELF12345").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        let entries = parse(&w.finish());
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[0].0, "bin");
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
        assert_eq!(
            entries[1],
            (
                "bin/busybox".into(),
                S_IFREG | 0o755,
                b"\x7fELF12345".to_vec()
            )
        );
        assert_eq!(
            entries[2],
            ("bin/sh".into(), S_IFLNK | 0o777, b"busybox".to_vec())
        );
        assert_eq!(entries[3].2, b"#!/bin/sh\n");
    }

    #[test]
    fn bad_paths_are_refused() {
        let mut w = CpioWriter::new();
        for p in ["", "/init", "a/../b", "a//b"] {
            assert_eq!(w.file(p, 0o644, b""), Err(CpioError::BadPath(p.into())));
        }
    }
}
