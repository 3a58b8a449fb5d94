//! The file index of a volume snapshot: one record per path, sorted, used to pack a tree and to
//! find what changed since the previous snapshot.
//!
//! Paths are relative, `/`-separated, without `./`; the root directory itself is `"."`. Entries
//! are sorted by path bytes, so a directory always precedes its contents and the same tree always
//! gives the same order (and so the same layer bytes).
//!
//! The serialised index (`encode`) is zstd-compressed binary records (version 2, see `encode`);
//! `decode` also reads the zstd-compressed JSON of version 1
//! (`{"version": 1, "entries": [{"p": path, "t": kind, "s": size, ...}, ...]}`).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::fsys::{file_type, Dir, DirCache, Stat};
use super::pack::open_checked;
use crate::digest::{hash_reader, Algorithm, StreamHasher};

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

fn utf8(name: &[u8], full: impl FnOnce() -> PathBuf) -> Result<String, ScanError> {
    std::str::from_utf8(name)
        .map(str::to_owned)
        .map_err(|_| ScanError::NotUtf8(full()))
}

fn kind_of(st: &Stat) -> Option<Kind> {
    Some(match file_type(st) {
        libc::S_IFREG => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        libc::S_IFIFO => Kind::Fifo,
        libc::S_IFCHR => Kind::Char,
        libc::S_IFBLK => Kind::Block,
        _ => return None, // sockets cannot be archived; tar skips them too
    })
}

fn entry_from(path: String, kind: Kind, st: &Stat, link: Option<String>) -> Entry {
    Entry {
        path,
        kind,
        size: if kind == Kind::File {
            st.st_size as u64
        } else {
            0
        },
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
        ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec,
        ino: st.st_ino,
        dev: st.st_dev,
        // nlink_t is u64 on x86_64, u32 on aarch64
        #[allow(clippy::unnecessary_cast)]
        nlink: st.st_nlink as u64,
        rdev: if matches!(kind, Kind::Char | Kind::Block) {
            st.st_rdev
        } else {
            0
        },
        link,
        digest: None,
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix == ROOT {
        name.to_owned()
    } else {
        let mut s = String::with_capacity(prefix.len() + 1 + name.len());
        s.push_str(prefix);
        s.push('/');
        s.push_str(name);
        s
    }
}

thread_local! {
    static DENTS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Scan the directory `dir` (open, at `rel`): its entries go to `out`, its subdirectories are
/// opened (relative to `dir`, never through a symlink) and scanned in parallel. A subdirectory's
/// entry is taken from the handle it was opened as, so what the index records is what was walked.
fn scan_dir(root: &Path, dir: &Dir, rel: &str, out: &mut Vec<Entry>) -> Result<(), ScanError> {
    let full = |name: Option<&[u8]>| {
        let mut p = if rel == ROOT {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        if let Some(n) = name {
            p.push(OsStr::from_bytes(n));
        }
        p
    };
    let names = DENTS
        .with(|b| dir.names(&mut b.borrow_mut()))
        .map_err(|e| ScanError::Io(full(None), e))?;
    let mut subdirs: Vec<(String, Dir)> = Vec::new();
    for cname in names {
        let name = cname.as_bytes();
        let st = match dir.lstat_at(&cname) {
            Ok(st) => st,
            // Deleted between getdents and stat: a live volume; the next snapshot sees it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(ScanError::Io(full(Some(name)), e)),
        };
        let Some(mut kind) = kind_of(&st) else {
            continue;
        };
        let child = join(rel, &utf8(name, || full(Some(name)))?);
        let mut st = st;
        if kind == Kind::Dir {
            match dir.open_dir(&cname) {
                Ok(d) => {
                    // record the directory actually opened (it may have been replaced meanwhile)
                    st = d.stat().map_err(|e| ScanError::Io(full(Some(name)), e))?;
                    out.push(entry_from(child.clone(), Kind::Dir, &st, None));
                    subdirs.push((child, d));
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                    // replaced by a non-directory since the stat: record what is there now
                    st = match dir.lstat_at(&cname) {
                        Ok(st) => st,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(ScanError::Io(full(Some(name)), e)),
                    };
                    match kind_of(&st) {
                        Some(Kind::Dir) | None => {
                            return Err(ScanError::Io(
                                full(Some(name)),
                                io::Error::other("changed while scanning"),
                            ))
                        }
                        Some(k) => kind = k,
                    }
                }
                Err(e) => return Err(ScanError::Io(full(Some(name)), e)),
            }
        }
        let mut link = None;
        let mut tries = 0;
        while kind == Kind::Symlink {
            match dir.readlink_at(&cname) {
                Ok(t) => {
                    link = Some(utf8(&t, || full(Some(name)))?);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                // not a symlink any more (replaced since the stat): record what is there now
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && tries < 8 => {
                    tries += 1;
                    st = match dir.lstat_at(&cname) {
                        Ok(st) => st,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                        Err(e) => return Err(ScanError::Io(full(Some(name)), e)),
                    };
                    match kind_of(&st) {
                        Some(Kind::Dir) | None => {
                            return Err(ScanError::Io(
                                full(Some(name)),
                                io::Error::other("changed while scanning"),
                            ))
                        }
                        Some(k) => kind = k,
                    }
                }
                Err(e) => return Err(ScanError::Io(full(Some(name)), e)),
            }
        }
        if kind == Kind::Symlink && link.is_none() {
            continue; // deleted meanwhile
        }
        out.push(entry_from(child, kind, &st, link));
    }
    let nested: Result<Vec<Vec<Entry>>, ScanError> = subdirs
        .into_par_iter()
        .map(|(rel, d)| {
            let mut v = Vec::new();
            scan_dir(root, &d, &rel, &mut v).map(|_| v)
        })
        .collect();
    for v in nested? {
        out.extend(v);
    }
    Ok(())
}

/// Walk `root` (never following symlinks: every name is opened relative to its directory's
/// handle with `O_NOFOLLOW`) and return every entry, sorted, root first.
/// With `content`, regular files also get a content digest (read in parallel).
pub fn scan(root: &Path, content: Option<Algorithm>) -> Result<Vec<Entry>, ScanError> {
    let dir = Dir::open(root).map_err(|e| {
        let e = if e.raw_os_error() == Some(libc::ELOOP) {
            io::Error::new(io::ErrorKind::NotADirectory, "not a directory")
        } else {
            e
        };
        ScanError::Io(root.to_path_buf(), e)
    })?;
    let st = dir
        .stat()
        .map_err(|e| ScanError::Io(root.to_path_buf(), e))?;
    let mut out = vec![entry_from(ROOT.to_owned(), Kind::Dir, &st, None)];
    scan_dir(root, &dir, ROOT, &mut out)?;
    sort_entries(&mut out);
    if let Some(alg) = content {
        // read like the packer: relative to directory handles, the scanned inode or an error
        out.par_iter_mut()
            .filter(|e| e.kind == Kind::File)
            .try_for_each_init(
                || DirCache::new(&dir),
                |dirs, e| {
                    let hashed = open_checked(dirs, e).and_then(|f| hash_reader(alg, f));
                    let (hex, _) = hashed.map_err(|err| ScanError::Io(root.join(&e.path), err))?;
                    e.digest = Some(format!("{}:{hex}", alg.name()));
                    Ok::<(), ScanError>(())
                },
            )?;
    }
    Ok(out)
}

/// Sort order of entries in an index and in a layer: root first, then by path bytes.
pub fn sort_entries(entries: &mut [Entry]) {
    entries.par_sort_unstable_by(|a, b| sort_key(&a.path).cmp(sort_key(&b.path)));
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

/// Magic of the binary index (version 2), at the start of the decompressed bytes.
pub const INDEX_MAGIC: &[u8; 8] = b"CLWIDX2\n";
/// Version of the binary index.
pub const BINARY_INDEX_VERSION: u32 = 2;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn kind_code(k: Kind) -> u8 {
    match k {
        Kind::File => 0,
        Kind::Dir => 1,
        Kind::Symlink => 2,
        Kind::Fifo => 3,
        Kind::Char => 4,
        Kind::Block => 5,
    }
}

fn kind_from(c: u8) -> Option<Kind> {
    Some(match c {
        0 => Kind::File,
        1 => Kind::Dir,
        2 => Kind::Symlink,
        3 => Kind::Fifo,
        4 => Kind::Char,
        5 => Kind::Block,
        _ => return None,
    })
}

/// Serialise an index (version 2): zstd-compressed binary records, paths prefix-compressed
/// against the previous entry's:
///
/// `CLWIDX2\n`, varint count, then per entry: varint shared-prefix length, varint suffix
/// length, suffix bytes, kind (u8), flags (u8: 1 link, 2 digest), varints size, mode, uid, gid,
/// zigzag mtime_ns, zigzag ctime_ns, ino, dev, nlink, rdev, then the link target and the
/// digest (varint length + bytes) when flagged. Deterministic: the same entries give the same
/// bytes.
pub fn encode(entries: &[Entry]) -> io::Result<Vec<u8>> {
    let mut raw = Vec::with_capacity(16 + entries.len() * 64);
    raw.extend_from_slice(INDEX_MAGIC);
    put_varint(&mut raw, entries.len() as u64);
    let mut prev: &[u8] = b"";
    for e in entries {
        let p = e.path.as_bytes();
        let shared = prev.iter().zip(p).take_while(|(a, b)| a == b).count();
        put_varint(&mut raw, shared as u64);
        put_varint(&mut raw, (p.len() - shared) as u64);
        raw.extend_from_slice(&p[shared..]);
        prev = p;
        raw.push(kind_code(e.kind));
        raw.push(u8::from(e.link.is_some()) | (u8::from(e.digest.is_some()) << 1));
        for v in [
            e.size,
            u64::from(e.mode),
            u64::from(e.uid),
            u64::from(e.gid),
            zigzag(e.mtime_ns),
            zigzag(e.ctime_ns),
            e.ino,
            e.dev,
            e.nlink,
            e.rdev,
        ] {
            put_varint(&mut raw, v);
        }
        for s in [e.link.as_deref(), e.digest.as_deref()]
            .into_iter()
            .flatten()
        {
            put_varint(&mut raw, s.len() as u64);
            raw.extend_from_slice(s.as_bytes());
        }
    }
    zstd::bulk::compress(&raw, 3)
}

/// Serialise an index in the version 1 format (zstd-compressed JSON), as older releases wrote.
pub fn encode_json(entries: &[Entry]) -> io::Result<Vec<u8>> {
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

/// Largest decompressed index we accept (a 1M-file volume is ~60 MiB binary, ~150 MiB JSON).
pub const MAX_INDEX_BYTES: usize = 1 << 30;

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("volume index: {what}"))
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn varint(&mut self) -> io::Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.data.get(self.pos).ok_or_else(|| bad("truncated"))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(bad("varint too long"))
    }

    fn byte(&mut self) -> io::Result<u8> {
        let b = *self.data.get(self.pos).ok_or_else(|| bad("truncated"))?;
        self.pos += 1;
        Ok(b)
    }

    fn bytes(&mut self, n: u64) -> io::Result<&'a [u8]> {
        let n = usize::try_from(n).map_err(|_| bad("length"))?;
        let end = self.pos.checked_add(n).ok_or_else(|| bad("length"))?;
        let s = self
            .data
            .get(self.pos..end)
            .ok_or_else(|| bad("truncated"))?;
        self.pos = end;
        Ok(s)
    }

    fn string(&mut self) -> io::Result<String> {
        let n = self.varint()?;
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| bad("string is not UTF-8"))
    }
}

fn decode_binary(raw: &[u8]) -> io::Result<Vec<Entry>> {
    let mut c = Cursor {
        data: raw,
        pos: INDEX_MAGIC.len(),
    };
    let count = c.varint()?;
    // every entry takes at least 14 bytes: a count beyond that is a lie
    if count > (raw.len() as u64) / 14 + 1 {
        return Err(bad("entry count larger than the data"));
    }
    let mut out: Vec<Entry> = Vec::with_capacity(count as usize);
    let mut path: Vec<u8> = Vec::new();
    for _ in 0..count {
        let shared = c.varint()?;
        let suffix_len = c.varint()?;
        if shared > path.len() as u64 {
            return Err(bad("bad path prefix"));
        }
        path.truncate(shared as usize);
        path.extend_from_slice(c.bytes(suffix_len)?);
        let p = std::str::from_utf8(&path)
            .map_err(|_| bad("path is not UTF-8"))?
            .to_owned();
        let kind = kind_from(c.byte()?).ok_or_else(|| bad("unknown entry kind"))?;
        let flags = c.byte()?;
        if flags & !3 != 0 {
            return Err(bad("unknown flags"));
        }
        let mut v = [0u64; 10];
        for x in v.iter_mut() {
            *x = c.varint()?;
        }
        let small = |x: u64| u32::try_from(x).map_err(|_| bad("field out of range"));
        let link = if flags & 1 != 0 {
            Some(c.string()?)
        } else {
            None
        };
        let digest = if flags & 2 != 0 {
            Some(c.string()?)
        } else {
            None
        };
        if let Some(prev) = out.last() {
            if sort_key(&prev.path) >= sort_key(&p) {
                return Err(bad("entries out of order"));
            }
        }
        out.push(Entry {
            path: p,
            kind,
            size: v[0],
            mode: small(v[1])?,
            uid: small(v[2])?,
            gid: small(v[3])?,
            mtime_ns: unzigzag(v[4]),
            ctime_ns: unzigzag(v[5]),
            ino: v[6],
            dev: v[7],
            nlink: v[8],
            rdev: v[9],
            link,
            digest,
        });
    }
    if c.pos != raw.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(out)
}

/// Decode an index written by `encode` (binary, version 2) or by older releases (JSON, version 1).
pub fn decode(data: &[u8]) -> io::Result<Vec<Entry>> {
    let mut raw = Vec::new();
    let mut dec = zstd::stream::read::Decoder::new(data)?;
    io::Read::read_to_end(
        &mut io::Read::take(&mut dec, MAX_INDEX_BYTES as u64 + 1),
        &mut raw,
    )?;
    if raw.len() > MAX_INDEX_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "volume index too large",
        ));
    }
    if raw.starts_with(INDEX_MAGIC) {
        return decode_binary(&raw);
    }
    let file: IndexFile = serde_json::from_slice(&raw)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("volume index: {e}")))?;
    if file.version != INDEX_VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unsupported volume index version {}", file.version),
        ));
    }
    Ok(file.entries)
}

/// A digest of what `diff` compares (paths and the metadata `same_metadata` looks at; content
/// digests with `content`): two indexes with the same fingerprint have an empty delta, so an
/// unchanged tree is recognised without decoding the parent's index. (Different fingerprints do
/// not imply a non-empty delta: `diff` decides then.) BLAKE3: 5 ms for 100k entries here
/// where SHA-256 took 9 ms, on the path of every no-change snapshot.
pub fn fingerprint(entries: &[Entry], content: bool) -> String {
    // Records are hashed 64 KiB at a time: BLAKE3 then works on many 1 KiB chunks in parallel
    // lanes, where ~100-byte updates would run one block at a time.
    const BATCH: usize = 64 << 10;
    let mut h = StreamHasher::new(Algorithm::Blake3);
    let mut rec: Vec<u8> = Vec::with_capacity(BATCH + 4096);
    for e in entries {
        if rec.len() >= BATCH {
            h.update(&rec);
            rec.clear();
        }
        rec.extend_from_slice(&(e.path.len() as u64).to_le_bytes());
        rec.extend_from_slice(e.path.as_bytes());
        rec.push(e.kind as u8);
        for v in [
            e.size,
            u64::from(e.mode),
            u64::from(e.uid),
            u64::from(e.gid),
            e.mtime_ns as u64,
            e.ctime_ns as u64,
            e.ino,
            e.rdev,
        ] {
            rec.extend_from_slice(&v.to_le_bytes());
        }
        for opt in [
            e.link.as_deref(),
            if content { e.digest.as_deref() } else { None },
        ] {
            match opt {
                Some(v) => {
                    rec.push(1);
                    rec.extend_from_slice(&(v.len() as u64).to_le_bytes());
                    rec.extend_from_slice(v.as_bytes());
                }
                None => rec.push(0),
            }
        }
    }
    h.update(&rec);
    h.digest_string()
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
    // Both sides are sorted by path (root first): one merge pass pairs each new entry with its
    // old self and lists what was deleted, with no hashing of paths.
    let mut old_of: Vec<Option<&Entry>> = Vec::with_capacity(new.len());
    let mut deleted_list: Vec<&Entry> = Vec::new();
    let mut oi = 0usize;
    for e in new {
        let key = sort_key(&e.path);
        while oi < old.len() && sort_key(&old[oi].path) < key {
            deleted_list.push(&old[oi]);
            oi += 1;
        }
        if oi < old.len() && sort_key(&old[oi].path) == key {
            old_of.push(Some(&old[oi]));
            oi += 1;
        } else {
            old_of.push(None);
        }
    }
    deleted_list.extend(old[oi..].iter());
    let new_kind = |p: &str| -> Option<Kind> {
        let key = sort_key(p);
        new.binary_search_by(|e| sort_key(&e.path).cmp(key))
            .ok()
            .map(|i| new[i].kind)
    };

    // Directories recreated since `old` become opaque: their subtree is packed in full.
    let mut opaque: Vec<String> = Vec::new();
    for (e, o) in new.iter().zip(&old_of) {
        if e.kind == Kind::Dir && e.path != ROOT {
            if let Some(o) = o {
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
        .zip(&old_of)
        .map(|(e, o)| match o {
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
    let deleted: HashSet<&str> = deleted_list.iter().map(|e| e.path.as_str()).collect();
    for e in &deleted_list {
        let p = e.path.as_str();
        let parent = parent_of(p);
        if deleted.contains(parent) {
            continue;
        }
        if new_kind(parent) != Some(Kind::Dir) {
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
    use std::fs;
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
        let old = decode(&encode_json(&entries).expect("encode")).expect("decode v1");
        assert_eq!(old, entries);
        let mut odd = entries.clone();
        odd[1].mtime_ns = -5;
        odd[1].digest = Some("sha256:00".into());
        odd[1].uid = u32::MAX;
        assert_eq!(decode(&encode(&odd).expect("encode")).expect("decode"), odd);
        // damaged: truncated and reordered records are refused
        let raw = zstd::bulk::decompress(&encode(&entries).expect("encode"), 1 << 20).expect("raw");
        for cut in [raw.len() - 1, raw.len() / 2, INDEX_MAGIC.len() + 1] {
            let z = zstd::bulk::compress(&raw[..cut], 1).expect("zstd");
            assert!(decode(&z).is_err(), "cut at {cut}");
        }
        let mut rev = entries.clone();
        rev.reverse();
        assert!(decode(&encode(&rev).expect("encode")).is_err());
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
