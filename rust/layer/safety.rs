//! What an untrusted layer may do to the target directory, and the limits it must stay within.
//!
//! Every archive path goes through `clean_path` (no absolute paths, no `..`, no NUL); every
//! write is relative to a directory handle: the root's (opened once, never re-resolved by path)
//! and below it each parent opened component by component without following symlinks (whether
//! they came from this layer or an earlier one) by `SafeRoot::dir`; the final component is
//! always replaced, never opened through (O_NOFOLLOW | O_EXCL). The limit counters
//! sit on the byte streams themselves (`LimitedReader`), so a bomb hidden anywhere (in a body,
//! a PAX header, or after the end-of-archive marker) is stopped as it is decompressed.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use cap_fs_ext::DirExt;
use cap_std::fs::Dir;
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

/// The target directory, held by a handle, and handles on the directories below it.
///
/// Nothing is ever resolved by path from outside: the root is a descriptor opened once (the
/// caller's temp directory, `O_DIRECTORY|O_NOFOLLOW`), and every directory below it is opened
/// relative to its parent's handle, one component at a time, without following symlinks
/// (`cap-std`: `openat2(RESOLVE_BENEATH)` where the kernel has it). Renaming a symlink over the
/// root or any directory of the tree while we work changes nothing for us: we hold the inodes.
/// Operations on an entry act on one final name relative to its parent's handle.
pub struct SafeRoot {
    root: Arc<Dir>,
    /// Where the root was when opened, for messages only (never used to reach anything).
    shown: PathBuf,
    /// Handles of directories verified to be real directories (opened nofollow or created by
    /// us), by relative path; bounded (cleared when full) so huge trees keep few descriptors.
    dirs: HashMap<String, Arc<Dir>>,
    /// Directories this root created as missing parents (`dir` with `create`), never forgotten:
    /// with the entries written, what may exist in a target that started empty.
    created: HashSet<String>,
}

/// At most this many directory handles are kept open.
const DIR_CACHE: usize = 512;

impl SafeRoot {
    /// Open `root` (its last component must not be a symlink) as the handle everything goes
    /// through.
    pub fn open(root: &Path) -> Result<Self, UnpackError> {
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(root)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::ENOTDIR) => UnpackError::Io(
                    root.display().to_string(),
                    io::Error::new(io::ErrorKind::NotADirectory, "target is not a directory"),
                ),
                _ => UnpackError::Io(root.display().to_string(), e),
            })?;
        Ok(Self::from_file(file, root.to_path_buf()))
    }

    /// Take an already open directory descriptor as the root.
    pub fn from_file(file: fs::File, shown: PathBuf) -> Self {
        SafeRoot {
            root: Arc::new(Dir::from_std_file(file)),
            shown,
            dirs: HashMap::new(),
            created: HashSet::new(),
        }
    }

    /// Did `dir(.., create)` make the directory `rel` (as a missing parent)?
    pub fn created(&self, rel: &str) -> bool {
        self.created.contains(rel)
    }

    /// The root's handle.
    pub fn root(&self) -> &Dir {
        &self.root
    }

    /// `rel` as a path for messages.
    pub fn shown(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.shown.display().to_string()
        } else {
            self.shown.join(rel).display().to_string()
        }
    }

    /// Forget the handles at or below `rel` (it is being removed or replaced).
    pub fn forget(&mut self, rel: &str) {
        self.dirs.remove(rel);
        let prefix = format!("{rel}/");
        self.dirs.retain(|p, _| !p.starts_with(&prefix));
    }

    /// The handle of directory `rel` ("" is the root). Each component is opened without
    /// following symlinks; missing ones are created (mode 0755) when `create`, else `None`.
    /// A symlink or non-directory on the way is refused (`what` names the entry for messages).
    pub fn dir(
        &mut self,
        rel: &str,
        create: bool,
        what: &str,
    ) -> Result<Option<Arc<Dir>>, UnpackError> {
        if rel.is_empty() {
            return Ok(Some(self.root.clone()));
        }
        if let Some(d) = self.dirs.get(rel) {
            return Ok(Some(d.clone()));
        }
        // Start from the deepest cached ancestor.
        let mut cur = self.root.clone();
        let mut start = 0;
        let mut probe = rel;
        while let Some(i) = probe.rfind('/') {
            probe = &rel[..i];
            if let Some(d) = self.dirs.get(probe) {
                cur = d.clone();
                start = i + 1;
                break;
            }
        }
        let mut end = start;
        loop {
            let stop = rel[end..].find('/').map_or(rel.len(), |p| end + p);
            let name = &rel[end..stop];
            let sub = &rel[..stop];
            let next = match cur.open_dir_nofollow(name) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    match cur.create_dir(name) {
                        Ok(()) => {
                            self.created.insert(sub.to_owned());
                        }
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(UnpackError::Io(self.shown(sub), e)),
                    }
                    cur.open_dir_nofollow(name)
                        .map_err(|e| self.not_a_dir(&cur, name, sub, what, e))?
                }
                Err(e) => return Err(self.not_a_dir(&cur, name, sub, what, e)),
            };
            let next = Arc::new(next);
            if self.dirs.len() >= DIR_CACHE {
                self.dirs.clear();
            }
            self.dirs.insert(sub.to_owned(), next.clone());
            cur = next;
            if stop == rel.len() {
                return Ok(Some(cur));
            }
            end = stop + 1;
        }
    }

    fn not_a_dir(
        &self,
        parent: &Dir,
        name: &str,
        sub: &str,
        what: &str,
        e: io::Error,
    ) -> UnpackError {
        match parent.symlink_metadata(name) {
            Ok(md) if md.file_type().is_symlink() => unsafe_err(format!(
                "{what:?} would be written through the symlink {sub:?}"
            )),
            Ok(md) if !md.is_dir() => {
                unsafe_err(format!("{what:?}: parent {sub:?} is not a directory"))
            }
            _ => UnpackError::Io(self.shown(sub), e),
        }
    }

    /// The handle of `rel`'s parent directory (verified as in `dir`) and `rel`'s last name.
    pub fn parent<'a>(
        &mut self,
        rel: &'a str,
        create: bool,
    ) -> Result<Option<(Arc<Dir>, &'a str)>, UnpackError> {
        let (parent, name) = match rel.rfind('/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => ("", rel),
        };
        Ok(self.dir(parent, create, rel)?.map(|d| (d, name)))
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
        let mut root = SafeRoot::open(t.path()).expect("open");
        assert!(matches!(
            root.parent("link/x", true),
            Err(UnpackError::Unsafe(_))
        ));
        assert!(root.parent("a/b/c", true).expect("create").is_some());
        assert!(t.path().join("a/b").is_dir());
        assert!(root.dirs.contains_key("a/b"));
        root.forget("a");
        assert!(!root.dirs.contains_key("a/b"));
        assert!(root.parent("missing/x", false).expect("lookup").is_none());
    }

    #[test]
    fn root_is_held_not_resolved() {
        // Swapping a symlink in at the root's path after opening changes nothing.
        let base = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let r = base.path().join("r");
        fs::create_dir(&r).expect("mkdir");
        let mut root = SafeRoot::open(&r).expect("open");
        fs::rename(&r, base.path().join("moved")).expect("mv");
        std::os::unix::fs::symlink(outside.path(), &r).expect("symlink");
        root.parent("d/f", true).expect("mkdir");
        assert!(base.path().join("moved/d").is_dir());
        assert_eq!(fs::read_dir(outside.path()).expect("ls").count(), 0);
        assert!(SafeRoot::open(&r).is_err());
    }
}
