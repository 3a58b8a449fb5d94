//! Directory handles for the scanner and the packer: every name is resolved relative to an open
//! directory with `O_NOFOLLOW`, so a symlink swapped in for a file or a directory after the scan is
//! never followed, and nothing is looked up by full path (one path walk per directory, not per
//! file). Directories are read with `getdents64` in 64 KiB batches.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// An open directory (`O_RDONLY | O_DIRECTORY | O_NOFOLLOW`).
pub struct Dir(OwnedFd);

/// `lstat`-like metadata (what the index records and the packer checks).
pub type Stat = libc::stat;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn retry<T, F: FnMut() -> io::Result<T>>(mut f: F) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

pub fn c_name(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

const DIR_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;

impl Dir {
    /// Open `path` as a directory; its last component must not be a symlink.
    pub fn open(path: &Path) -> io::Result<Dir> {
        let c = c_name(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))?;
        // SAFETY: a valid NUL-terminated path; the returned fd is owned by the Dir.
        let fd = retry(|| cvt(unsafe { libc::open(c.as_ptr(), DIR_FLAGS) }))?;
        Ok(Dir(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Open the subdirectory `name` (never through a symlink: ELOOP/ENOTDIR if it is not a
    /// directory any more).
    pub fn open_dir(&self, name: &CStr) -> io::Result<Dir> {
        // SAFETY: valid fd and NUL-terminated name; the returned fd is owned by the Dir.
        let fd = retry(|| cvt(unsafe { libc::openat(self.fd(), name.as_ptr(), DIR_FLAGS) }))?;
        Ok(Dir(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Open the regular file `name` for reading, never following a symlink and never blocking
    /// on a FIFO swapped in for it (`O_NONBLOCK` is ignored by regular files).
    pub fn open_file(&self, name: &CStr) -> io::Result<std::fs::File> {
        let flags =
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK;
        // SAFETY: valid fd and NUL-terminated name; the returned fd is owned by the File.
        let fd = retry(|| cvt(unsafe { libc::openat(self.fd(), name.as_ptr(), flags) }))?;
        Ok(unsafe { std::fs::File::from_raw_fd(fd) })
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    pub fn stat(&self) -> io::Result<Stat> {
        fstat(self.fd())
    }

    /// `fstatat(AT_SYMLINK_NOFOLLOW)` of `name` in this directory.
    pub fn lstat_at(&self, name: &CStr) -> io::Result<Stat> {
        // SAFETY: zeroed stat is a valid out-parameter; fd and name are valid.
        let mut st: Stat = unsafe { std::mem::zeroed() };
        retry(|| {
            cvt(unsafe {
                libc::fstatat(self.fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW)
            })
        })?;
        Ok(st)
    }

    /// The target of the symlink `name`, verbatim.
    pub fn readlink_at(&self, name: &CStr) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: buf is writable for buf.len() bytes; fd and name are valid.
            let n = unsafe {
                libc::readlinkat(self.fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = n as usize;
            if n < buf.len() {
                buf.truncate(n);
                return Ok(buf);
            }
            let grow = buf.len() * 2;
            buf.resize(grow, 0);
        }
    }

    /// Every name in the directory except `.` and `..`, NUL-terminated, read with `getdents64`
    /// into `buf` (reused between calls).
    pub fn names(&self, buf: &mut Vec<u8>) -> io::Result<Vec<CString>> {
        const BUF: usize = 64 * 1024;
        if buf.len() < BUF {
            buf.resize(BUF, 0);
        }
        let mut out = Vec::new();
        loop {
            // SAFETY: buf is writable for buf.len() bytes; the kernel fills whole records.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_getdents64,
                    self.fd(),
                    buf.as_mut_ptr(),
                    buf.len() as libc::c_ulong,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Ok(out);
            }
            let n = n as usize;
            let mut off = 0usize;
            // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
            while off + 19 <= n {
                let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
                if reclen < 20 || off + reclen > n {
                    return Err(io::Error::other("getdents64: malformed record"));
                }
                let name = &buf[off + 19..off + reclen];
                let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                let name = &name[..len];
                if name != b"." && name != b".." {
                    out.push(c_name(name)?);
                }
                off += reclen;
            }
        }
    }
}

pub fn fstat(fd: RawFd) -> io::Result<Stat> {
    // SAFETY: zeroed stat is a valid out-parameter; fd is a descriptor we own.
    let mut st: Stat = unsafe { std::mem::zeroed() };
    retry(|| cvt(unsafe { libc::fstat(fd, &mut st) }))?;
    Ok(st)
}

pub fn file_type(st: &Stat) -> libc::mode_t {
    st.st_mode & libc::S_IFMT
}

/// A per-thread stack of open directories along the last path used, so that the files of one
/// directory (consecutive in index order) cost one `openat` each and a directory change costs
/// one `openat` per component that differs.
pub struct DirCache<'a> {
    root: &'a Dir,
    /// (relative path of the directory, its handle), each an ancestor of the next.
    stack: Vec<(String, Dir)>,
}

impl<'a> DirCache<'a> {
    pub fn new(root: &'a Dir) -> Self {
        DirCache {
            root,
            stack: Vec::new(),
        }
    }

    /// The directory `rel` ("" or "." for the root), opened one component at a time without
    /// following symlinks.
    pub fn get(&mut self, rel: &str) -> io::Result<&Dir> {
        if rel.is_empty() || rel == "." {
            return Ok(self.root);
        }
        // keep the longest cached ancestor (or `rel` itself)
        while let Some((p, _)) = self.stack.last() {
            let is_ancestor = rel == p.as_str()
                || (rel.len() > p.len()
                    && rel.starts_with(p.as_str())
                    && rel.as_bytes()[p.len()] == b'/');
            if is_ancestor {
                break;
            }
            self.stack.pop();
        }
        let done = self.stack.last().map_or(0, |(p, _)| p.len());
        if done < rel.len() {
            let start = if done == 0 { 0 } else { done + 1 };
            for comp in rel[start..].split('/') {
                let c = c_name(comp.as_bytes())?;
                let parent = self.stack.last().map_or(self.root, |(_, d)| d);
                let d = parent.open_dir(&c)?;
                let path = match self.stack.last() {
                    Some((p, _)) => format!("{p}/{comp}"),
                    None => comp.to_owned(),
                };
                self.stack.push((path, d));
            }
        }
        Ok(self.stack.last().map_or(self.root, |(_, d)| d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn names_and_cache() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = t.path();
        fs::create_dir_all(r.join("a/b/c")).expect("mkdir");
        fs::create_dir_all(r.join("a/x")).expect("mkdir");
        for i in 0..3000 {
            fs::write(r.join(format!("a/b/f{i:04}")), b"x").expect("write");
        }
        std::os::unix::fs::symlink("b", r.join("a/l")).expect("symlink");
        let root = Dir::open(r).expect("open");
        let mut buf = Vec::new();
        let mut cache = DirCache::new(&root);
        let names = cache
            .get("a/b")
            .expect("a/b")
            .names(&mut buf)
            .expect("names");
        assert_eq!(names.len(), 3001);
        assert_eq!(
            cache
                .get("a/b/c")
                .expect("c")
                .names(&mut buf)
                .expect("names")
                .len(),
            0
        );
        assert_eq!(
            cache
                .get("a/x")
                .expect("x")
                .names(&mut buf)
                .expect("names")
                .len(),
            0
        );
        assert!(cache.get("a/l").is_err(), "a symlink is never followed");
        let top = cache.get("a").expect("a").names(&mut buf).expect("names");
        assert_eq!(top.len(), 3);
    }
}
