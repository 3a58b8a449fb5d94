//! The file index of a volume snapshot: one record per path, sorted, used to pack a tree and to
//! find what changed since the previous snapshot.
//!
//! Paths are relative, `/`-separated, without `./`; the root directory itself is `"."`. Entries
//! are sorted by path bytes, so a directory always precedes its contents and the same tree always
//! gives the same order (and so the same layer bytes).
//!
//! The serialised index (`encode`/`decode`) is zstd-compressed JSON:
//! `{"version": 1, "entries": [{"p": path, "t": kind, "s": size, ...}, ...]}`.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::digest::{hash_path, Algorithm};

/// Version of the serialised index format.
pub const INDEX_VERSION: u32 = 1;
/// The root directory's path in the index.
pub const ROOT: &str = ".";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Char,
    Block,
}

/// One filesystem object as seen by `scan`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(rename = "p")]
    pub path: String,
    #[serde(rename = "t")]
    pub kind: Kind,
    /// Bytes of a regular file; 0 otherwise.
    #[serde(rename = "s", default)]
    pub size: u64,
    /// Permission bits including setuid/setgid/sticky (`st_mode & 0o7777`).
    #[serde(rename = "m")]
    pub mode: u32,
    #[serde(rename = "u", default)]
    pub uid: u32,
    #[serde(rename = "g", default)]
    pub gid: u32,
    #[serde(rename = "mt")]
    pub mtime_ns: i64,
    #[serde(rename = "ct", default)]
    pub ctime_ns: i64,
    #[serde(rename = "i", default)]
    pub ino: u64,
    #[serde(rename = "d", default)]
    pub dev: u64,
    #[serde(rename = "n", default)]
    pub nlink: u64,
    /// Device number of a char/block device.
    #[serde(rename = "r", default, skip_serializing_if = "is_zero")]
    pub rdev: u64,
    /// Symlink target, verbatim (never resolved).
    #[serde(rename = "l", default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// `algorithm:hex` of a regular file's content, when scanned with content digests.
    #[serde(rename = "h", default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Entry {
    /// Is this one of several names of the same regular file?
    pub fn is_hardlinked(&self) -> bool {
        self.kind == Kind::File && self.nlink > 1
    }

    fn same_metadata(&self, other: &Entry, content: bool) -> bool {
        self.kind == other.kind
            && self.size == other.size
            && self.mode == other.mode
            && self.uid == other.uid
            && self.gid == other.gid
            && self.mtime_ns == other.mtime_ns
            && self.ctime_ns == other.ctime_ns
            && self.ino == other.ino
            && self.rdev == other.rdev
            && self.link == other.link
            && (!content || self.digest == other.digest)
    }
}

#[derive(Debug)]
pub enum ScanError {
    Io(PathBuf, io::Error),
    /// A name or symlink target that is not UTF-8 (the index and PAX records are UTF-8).
    NotUtf8(PathBuf),
}

impl std::fmt::Display for ScanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScanError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            ScanError::NotUtf8(p) => write!(f, "{p:?}: file name is not UTF-8 (shown escaped)"),
        }
    }
}

impl std::error::Error for ScanError {}

fn utf8(name: &OsStr, full: &Path) -> Result<String, ScanError> {
    std::str::from_utf8(name.as_bytes())
        .map(str::to_owned)
        .map_err(|_| ScanError::NotUtf8(full.to_path_buf()))
}

fn entry_from(rel: String, full: &Path, md: &fs::Metadata) -> Result<Option<Entry>, ScanError> {
    let ft = md.file_type();
    let kind = if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_char_device() {
        Kind::Char
    } else if ft.is_block_device() {
        Kind::Block
    } else {
        return Ok(None); // sockets cannot be archived; tar skips them too
    };
    let link = if kind == Kind::Symlink {
        let target = fs::read_link(full).map_err(|e| ScanError::Io(full.to_path_buf(), e))?;
        Some(utf8(target.as_os_str(), full)?)
    } else {
        None
    };
    Ok(Some(Entry {
        path: rel,
        kind,
        size: if kind == Kind::File { md.size() } else { 0 },
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
        ino: md.ino(),
        dev: md.dev(),
        nlink: md.nlink(),
        rdev: if matches!(kind, Kind::Char | Kind::Block) {
            md.rdev()
        } else {
            0
        },
        link,
        digest: None,
    }))
}

fn join(prefix: &str, name: &str) -> String {
    if prefix == ROOT {
        name.to_owned()
    } else {
        format!("{prefix}/{name}")
    }
}

fn scan_dir(root: &Path, rel: &str, out: &mut Vec<Entry>) -> Result<(), ScanError> {
    let dir = if rel == ROOT {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let rd = fs::read_dir(&dir).map_err(|e| ScanError::Io(dir.clone(), e))?;
    let mut subdirs = Vec::new();
    for de in rd {
        let de = de.map_err(|e| ScanError::Io(dir.clone(), e))?;
        let full = de.path();
        let name = utf8(&de.file_name(), &full)?;
        let md = match fs::symlink_metadata(&full) {
            Ok(md) => md,
            // Deleted between readdir and lstat: a live volume; the next snapshot sees it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(ScanError::Io(full, e)),
        };
        let child = join(rel, &name);
        if let Some(e) = entry_from(child.clone(), &full, &md)? {
            if e.kind == Kind::Dir {
                subdirs.push(child);
            }
            out.push(e);
        }
    }
    let nested: Result<Vec<Vec<Entry>>, ScanError> = subdirs
        .par_iter()
        .map(|d| {
            let mut v = Vec::new();
            scan_dir(root, d, &mut v).map(|_| v)
        })
        .collect();
    for v in nested? {
        out.extend(v);
    }
    Ok(())
}

/// Walk `root` (never following symlinks) and return every entry, sorted, root first.
/// With `content`, regular files also get a content digest (read in parallel).
pub fn scan(root: &Path, content: Option<Algorithm>) -> Result<Vec<Entry>, ScanError> {
    let md = fs::symlink_metadata(root).map_err(|e| ScanError::Io(root.to_path_buf(), e))?;
    if !md.is_dir() {
        return Err(ScanError::Io(
            root.to_path_buf(),
            io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    let mut out = Vec::new();
    if let Some(e) = entry_from(ROOT.to_owned(), root, &md)? {
        out.push(e);
    }
    scan_dir(root, ROOT, &mut out)?;
    sort_entries(&mut out);
    if let Some(alg) = content {
        out.par_iter_mut()
            .filter(|e| e.kind == Kind::File)
            .try_for_each(|e| {
                let full = root.join(&e.path);
                let (hex, _) = hash_path(alg, &full).map_err(|err| ScanError::Io(full, err))?;
                e.digest = Some(format!("{}:{hex}", alg.name()));
                Ok::<(), ScanError>(())
            })?;
    }
    Ok(out)
}

/// Sort order of entries in an index and in a layer: root first, then by path bytes.
pub fn sort_entries(entries: &mut [Entry]) {
    entries.sort_by(|a, b| sort_key(&a.path).cmp(sort_key(&b.path)));
}

fn sort_key(path: &str) -> &[u8] {
    if path == ROOT {
        b""
    } else {
        path.as_bytes()
    }
}

#[derive(Serialize, Deserialize)]
struct IndexFile {
    version: u32,
    entries: Vec<Entry>,
}

/// Serialise an index: zstd-compressed JSON.
pub fn encode(entries: &[Entry]) -> io::Result<Vec<u8>> {
    #[derive(Serialize)]
    struct Borrowed<'a> {
        version: u32,
        entries: &'a [Entry],
    }
    let json = serde_json::to_vec(&Borrowed {
        version: INDEX_VERSION,
        entries,
    })
    .map_err(io::Error::other)?;
    zstd::bulk::compress(&json, 3)
}

/// Largest decompressed index we accept (a 100k-file volume is ~15 MiB).
pub const MAX_INDEX_BYTES: usize = 1 << 30;

pub fn decode(data: &[u8]) -> io::Result<Vec<Entry>> {
    let mut json = Vec::new();
    let mut dec = zstd::stream::read::Decoder::new(data)?;
    io::Read::read_to_end(
        &mut io::Read::take(&mut dec, MAX_INDEX_BYTES as u64 + 1),
        &mut json,
    )?;
    if json.len() > MAX_INDEX_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "volume index too large",
        ));
    }
    let file: IndexFile = serde_json::from_slice(&json)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("volume index: {e}")))?;
    if file.version != INDEX_VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unsupported volume index version {}", file.version),
        ));
    }
    Ok(file.entries)
}

/// What an incremental layer must hold to turn the `old` tree into the `new` one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Indexes into `new` of entries to pack (new, changed, or a hardlink partner of one).
    pub changed: Vec<usize>,
    /// Paths deleted since `old` (only the topmost of a deleted subtree).
    pub whiteouts: Vec<String>,
    /// Directories replaced by a new directory (different inode): everything below them in the
    /// older layers is hidden (`.wh..wh..opq`) and their whole content is packed again.
    pub opaque: Vec<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.whiteouts.is_empty() && self.opaque.is_empty()
    }

    /// Bytes of file content the delta packs (a hardlinked inode counts once).
    pub fn changed_bytes(&self, new: &[Entry]) -> u64 {
        let mut seen = HashSet::new();
        self.changed
            .iter()
            .map(|&i| &new[i])
            .filter(|e| !e.is_hardlinked() || seen.insert((e.dev, e.ino)))
            .map(|e| e.size)
            .sum()
    }
}

pub fn parent_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(i) => &path[..i],
        None if path == ROOT => "",
        None => ROOT,
    }
}

fn under(path: &str, dir: &str) -> bool {
    dir == ROOT
        || (path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/')
}

/// Compare two sorted indexes. `content` also compares content digests (both sides must have
/// been scanned with them).
pub fn diff(old: &[Entry], new: &[Entry], content: bool) -> Delta {
    let old_by_path: HashMap<&str, &Entry> = old.iter().map(|e| (e.path.as_str(), e)).collect();
    let new_kind: HashMap<&str, Kind> = new.iter().map(|e| (e.path.as_str(), e.kind)).collect();

    // Directories recreated since `old` become opaque: their subtree is packed in full.
    let mut opaque: Vec<String> = Vec::new();
    for e in new {
        if e.kind == Kind::Dir && e.path != ROOT {
            if let Some(o) = old_by_path.get(e.path.as_str()) {
                if o.kind == Kind::Dir
                    && o.ino != e.ino
                    && !opaque.iter().any(|d| under(&e.path, d))
                {
                    opaque.push(e.path.clone());
                }
            }
        }
    }
    let in_opaque = |p: &str| opaque.iter().any(|d| under(p, d));

    let mut changed_set: Vec<bool> = new
        .iter()
        .map(|e| match old_by_path.get(e.path.as_str()) {
            None => true,
            Some(o) => !o.same_metadata(e, content) || in_opaque(&e.path),
        })
        .collect();

    // A changed member of a hardlink group drags the whole group along, so that every layer is
    // self-contained: links in a layer only point at files of that layer.
    let mut groups: HashMap<(u64, u64), Vec<usize>> = HashMap::new();
    for (i, e) in new.iter().enumerate() {
        if e.is_hardlinked() {
            groups.entry((e.dev, e.ino)).or_default().push(i);
        }
    }
    for members in groups.values() {
        if members.len() > 1 && members.iter().any(|&i| changed_set[i]) {
            for &i in members {
                changed_set[i] = true;
            }
        }
    }
    let changed: Vec<usize> = (0..new.len()).filter(|&i| changed_set[i]).collect();

    // Whiteouts: topmost deleted paths whose parent is still a directory. Children of a directory
    // that became a file or symlink vanish when the new entry replaces the directory.
    let mut whiteouts = Vec::new();
    let deleted: HashSet<&str> = old
        .iter()
        .map(|e| e.path.as_str())
        .filter(|p| !new_kind.contains_key(p))
        .collect();
    for e in old {
        let p = e.path.as_str();
        if !deleted.contains(p) {
            continue;
        }
        let parent = parent_of(p);
        if deleted.contains(parent) {
            continue;
        }
        if new_kind.get(parent) != Some(&Kind::Dir) {
            continue;
        }
        if in_opaque(p) {
            continue;
        }
        whiteouts.push(p.to_owned());
    }
    Delta {
        changed,
        whiteouts,
        opaque,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn paths(entries: &[Entry]) -> Vec<&str> {
        entries.iter().map(|e| e.path.as_str()).collect()
    }

    #[test]
    fn scan_sorted_with_every_kind() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = t.path();
        fs::create_dir_all(r.join("d/e")).expect("mkdir");
        fs::write(r.join("d/f.txt"), b"hello").expect("write");
        fs::write(r.join("a b"), b"x").expect("write");
        symlink("/nonexistent", r.join("dangling")).expect("symlink");
        fs::hard_link(r.join("a b"), r.join("d/hl")).expect("link");
        let entries = scan(r, Some(Algorithm::Sha256)).expect("scan");
        assert_eq!(
            paths(&entries),
            vec![".", "a b", "d", "d/e", "d/f.txt", "d/hl", "dangling"]
        );
        let dangling = &entries[6];
        assert_eq!(dangling.kind, Kind::Symlink);
        assert_eq!(dangling.link.as_deref(), Some("/nonexistent"));
        assert_eq!(entries[4].size, 5);
        assert!(entries[1].is_hardlinked());
        assert_eq!(entries[1].ino, entries[5].ino);
        assert!(entries[4]
            .digest
            .as_deref()
            .is_some_and(|d| d.starts_with("sha256:2cf24dba")));
        let round = decode(&encode(&entries).expect("encode")).expect("decode");
        assert_eq!(round, entries);
    }

    #[test]
    fn diff_finds_changes_whiteouts_and_type_changes() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = t.path();
        fs::create_dir_all(r.join("gone/sub")).expect("mkdir");
        fs::write(r.join("gone/sub/x"), b"1").expect("write");
        fs::create_dir(r.join("becomes_file")).expect("mkdir");
        fs::write(r.join("becomes_file/child"), b"1").expect("write");
        fs::write(r.join("keep"), b"same").expect("write");
        fs::write(r.join("edit"), b"v1").expect("write");
        let old = scan(r, None).expect("scan");
        fs::remove_dir_all(r.join("gone")).expect("rm");
        fs::remove_dir_all(r.join("becomes_file")).expect("rm");
        fs::write(r.join("becomes_file"), b"now a file").expect("write");
        fs::write(r.join("edit"), b"v2 longer").expect("write");
        fs::write(r.join("new"), b"n").expect("write");
        let new = scan(r, None).expect("scan");
        let d = diff(&old, &new, false);
        let changed: Vec<&str> = d.changed.iter().map(|&i| new[i].path.as_str()).collect();
        assert!(changed.contains(&"becomes_file"));
        assert!(changed.contains(&"edit"));
        assert!(changed.contains(&"new"));
        assert!(!changed.contains(&"keep"));
        assert_eq!(d.whiteouts, vec!["gone".to_owned()]);
        assert!(diff(&new, &new, false).is_empty());
    }
}
