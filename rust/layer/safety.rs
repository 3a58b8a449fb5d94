//! What an untrusted layer may do to the target directory, and the limits it must stay within.
//!
//! Every archive path goes through `clean_path` (no absolute paths, no `..`, no NUL); every
//! parent directory of a write is checked with `lstat` to be a real directory (never a symlink,
//! whether it came from this layer or an earlier one) by `SafeRoot::ensure_parents`; the final
//! component is always replaced, never opened through (O_NOFOLLOW | O_EXCL). The limit counters
//! sit on the byte streams themselves (`LimitedReader`), so a bomb hidden anywhere (in a body,
//! a PAX header, or after the end-of-archive marker) is stopped as it is decompressed.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Configurable limits for unpacking untrusted layers.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Total uncompressed tar bytes over every layer of one unpack.
    pub max_bytes: u64,
    /// Total tar entries over every layer of one unpack.
    pub max_entries: u64,
    /// Largest uncompressed/compressed ratio of a layer, checked once past `RATIO_GRACE` bytes.
    pub max_ratio: u64,
    /// Create device nodes and FIFOs (refused otherwise).
    pub allow_devices: bool,
    /// Restore uid/gid (only possible as root).
    pub same_owner: bool,
}

/// The ratio check starts after this many uncompressed bytes (small layers compress oddly).
pub const RATIO_GRACE: u64 = 64 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 1 << 40,
            max_entries: 10_000_000,
            max_ratio: 1000,
            allow_devices: false,
            same_owner: false,
        }
    }
}

/// An error that is the archive's fault (escape attempt, limit, malformed entry), as opposed to
/// an I/O error of the machine.
#[derive(Debug)]
pub enum UnpackError {
    Unsafe(String),
    Io(String, io::Error),
    Digest(String),
}

impl std::fmt::Display for UnpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnpackError::Unsafe(m) => write!(f, "unsafe archive: {m}"),
            UnpackError::Io(c, e) => write!(f, "{c}: {e}"),
            UnpackError::Digest(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for UnpackError {}

pub fn unsafe_err(msg: impl Into<String>) -> UnpackError {
    UnpackError::Unsafe(msg.into())
}

pub fn io_ctx(ctx: impl std::fmt::Display) -> impl FnOnce(io::Error) -> UnpackError {
    move |e| UnpackError::Io(ctx.to_string(), e)
}

/// Turn an archive path into a clean relative path of normal components. `None` for the root
/// itself (`.`, `./`). Refuses absolute paths, `..`, NUL and non-UTF-8 names.
pub fn clean_path(raw: &[u8]) -> Result<Option<String>, UnpackError> {
    let shown = String::from_utf8_lossy(raw);
    if raw.contains(&0) {
        return Err(unsafe_err(format!("NUL in path {shown:?}")));
    }
    if raw.first() == Some(&b'/') {
        return Err(unsafe_err(format!("absolute path {shown:?}")));
    }
    let text =
        std::str::from_utf8(raw).map_err(|_| unsafe_err(format!("path {shown:?} is not UTF-8")))?;
    let mut parts = Vec::new();
    for comp in text.split('/') {
        match comp {
            "" | "." => {}
            ".." => return Err(unsafe_err(format!("path {shown:?} contains '..'"))),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    Ok(Some(parts.join("/")))
}

/// The target directory and what we know about it: directories verified (by lstat, or because
/// we created them) to be real directories, so repeated parents cost one hash lookup.
pub struct SafeRoot {
    pub root: PathBuf,
    verified: HashSet<String>,
}

impl SafeRoot {
    pub fn new(root: &Path) -> Self {
        SafeRoot {
            root: root.to_path_buf(),
            verified: HashSet::new(),
        }
    }

    pub fn full(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn mark_dir(&mut self, rel: &str) {
        self.verified.insert(rel.to_owned());
    }

    /// Forget everything at or below `rel` (it is being removed or replaced).
    pub fn forget(&mut self, rel: &str) {
        if !self.verified.remove(rel) {
            // not a verified directory: nothing can be verified below it either
            return;
        }
        let prefix = format!("{rel}/");
        self.verified.retain(|p| !p.starts_with(&prefix));
    }

    /// Check that every ancestor of `rel` is a real directory inside the root, creating missing
    /// ones (mode 0755) when `create`. Returns false if an ancestor is missing and not created.
    pub fn ensure_parents(&mut self, rel: &str, create: bool) -> Result<bool, UnpackError> {
        let mut end = 0;
        let bytes = rel.as_bytes();
        while let Some(pos) = bytes[end..].iter().position(|&b| b == b'/') {
            let dir = &rel[..end + pos];
            end += pos + 1;
            if self.verified.contains(dir) {
                continue;
            }
            let full = self.full(dir);
            match fs::symlink_metadata(&full) {
                Ok(md) if md.file_type().is_dir() => {}
                Ok(md) if md.file_type().is_symlink() => {
                    return Err(unsafe_err(format!(
                        "{rel:?} would be written through the symlink {dir:?}"
                    )));
                }
                Ok(_) => {
                    return Err(unsafe_err(format!(
                        "{rel:?}: parent {dir:?} is not a directory"
                    )));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(false);
                    }
                    fs::create_dir(&full).map_err(io_ctx(full.display()))?;
                }
                Err(e) => return Err(UnpackError::Io(full.display().to_string(), e)),
            }
            self.verified.insert(dir.to_owned());
        }
        Ok(true)
    }
}

/// Shared counters of one unpack: uncompressed bytes and entries, against the limits.
#[derive(Default)]
pub struct Budget {
    pub bytes: AtomicU64,
    pub entries: AtomicU64,
    pub files: AtomicU64,
    pub file_bytes: AtomicU64,
    violation: Mutex<Option<String>>,
}

impl Budget {
    pub fn violate(&self, msg: String) -> io::Error {
        if let Ok(mut v) = self.violation.lock() {
            v.get_or_insert(msg.clone());
        }
        io::Error::other(msg)
    }

    /// The limit violation behind an I/O error, if that is what it was.
    pub fn violation(&self) -> Option<String> {
        self.violation.lock().ok().and_then(|v| v.clone())
    }
}

/// Counts bytes read through it into a shared counter.
pub struct CountingReader<R> {
    pub inner: R,
    pub count: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The decompressed side of a layer: counts it and enforces byte, ratio and per-layer size
/// limits as the bytes come out of the decompressor.
pub struct LimitedReader<R> {
    pub inner: R,
    pub layer_bytes: u64,
    pub compressed: Arc<AtomicU64>,
    pub budget: Arc<Budget>,
    pub limits: Limits,
    /// Expected uncompressed size of this layer, if the manifest says.
    pub max_layer_bytes: Option<u64>,
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 {
            return Ok(0);
        }
        self.layer_bytes += n as u64;
        let total = self.budget.bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if total > self.limits.max_bytes {
            return Err(self.budget.violate(format!(
                "more than {} uncompressed bytes (limit)",
                self.limits.max_bytes
            )));
        }
        if let Some(max) = self.max_layer_bytes {
            if self.layer_bytes > max {
                return Err(self.budget.violate(format!(
                    "layer is larger than the {max} bytes its descriptor declares"
                )));
            }
        }
        if self.limits.max_ratio > 0 && self.layer_bytes > RATIO_GRACE {
            let comp = self.compressed.load(Ordering::Relaxed).max(1);
            if self.layer_bytes / comp > self.limits.max_ratio {
                return Err(self.budget.violate(format!(
                    "compression ratio above {} ({} bytes from {comp}): decompression bomb",
                    self.limits.max_ratio, self.layer_bytes
                )));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        assert_eq!(
            clean_path(b"./a//b/./c").expect("ok").as_deref(),
            Some("a/b/c")
        );
        assert_eq!(clean_path(b"./").expect("ok"), None);
        assert!(clean_path(b"/etc/passwd").is_err());
        assert!(clean_path(b"a/../../x").is_err());
        assert!(clean_path(b"..").is_err());
        assert!(clean_path(b"a\0b").is_err());
        assert_eq!(
            clean_path("ünï cødé/x".as_bytes()).expect("ok").as_deref(),
            Some("ünï cødé/x")
        );
    }

    #[test]
    fn parents_through_symlink_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(outside.path(), t.path().join("link")).expect("symlink");
        let mut root = SafeRoot::new(t.path());
        assert!(matches!(
            root.ensure_parents("link/x", true),
            Err(UnpackError::Unsafe(_))
        ));
        assert!(root.ensure_parents("a/b/c", true).expect("create"));
        assert!(t.path().join("a/b").is_dir());
        root.forget("a");
        assert!(!root.verified.contains("a/b"));
    }
}
