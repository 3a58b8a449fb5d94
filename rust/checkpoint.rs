//! Checkpoint packs: many small files in one tar+zstd blob that can still be read one file at a
//! time with a single ranged read.
//!
//! A pack is a tar stream cut at member boundaries into groups of about `group_bytes`, each group
//! compressed as an independent zstd frame; the frames are concatenated. Since a concatenation of
//! zstd frames is one valid zstd stream and the groups end on member boundaries (the last one with
//! the end-of-archive marker), a pack is an ordinary tar+zstd layer for any other consumer, while
//! the checkpoint index records for every file the (offset, length) of its frame in the pack and
//! the offset of its body in the decompressed frame: one ranged read and one frame decompression
//! give one file back.
//!
//! - `scan`: walk a tree without following symlinks (regular files, directories, symlinks).
//! - `pack`: read files (`O_NOFOLLOW`, checked against the scanned inode), hash each, frame them,
//!   compress the frames in parallel.
//! - `extract`: decompress a frame (bounded) and slice one body out, verified by its digest.
//! - `synth_layer`: the tar stream a restore feeds to the layer unpacker (bodies taken from
//!   fetched frames and verified), wrapped in a zstd frame of raw (stored) blocks.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rayon::prelude::*;

use crate::digest::{Algorithm, StreamHasher};
use crate::errors::{DigestMismatchError, UnsafeArchiveError};

/// One scanned entry: (path, kind, size, mode, mtime_ns, ctime_ns, ino, dev, symlink target).
pub type ScanEntry = (
    String,
    &'static str,
    u64,
    u32,
    i64,
    i64,
    u64,
    u64,
    Option<String>,
);

#[derive(Debug)]
pub enum CkError {
    Io(String, io::Error),
    Unsafe(String),
    Digest(String),
    Invalid(String),
}

impl std::fmt::Display for CkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CkError::Io(c, e) => write!(f, "{c}: {e}"),
            CkError::Unsafe(m) | CkError::Digest(m) | CkError::Invalid(m) => f.write_str(m),
        }
    }
}

impl From<CkError> for PyErr {
    fn from(e: CkError) -> PyErr {
        match e {
            CkError::Io(c, err) => PyOSError::new_err(format!("{c}: {err}")),
            CkError::Unsafe(m) => UnsafeArchiveError::new_err(m),
            CkError::Digest(m) => DigestMismatchError::new_err(m),
            CkError::Invalid(m) => PyValueError::new_err(m),
        }
    }
}

fn ns(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

fn utf8_name(name: &OsStr, full: &Path) -> Result<String, CkError> {
    std::str::from_utf8(name.as_bytes())
        .map(str::to_owned)
        .map_err(|_| {
            CkError::Invalid(format!(
                "file name is not UTF-8: {}",
                full.as_os_str().as_bytes().escape_ascii()
            ))
        })
}

fn scan_dir(root: &Path, rel: &str, out: &mut Vec<ScanEntry>) -> Result<(), CkError> {
    let dir = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let rd = fs::read_dir(&dir).map_err(|e| CkError::Io(dir.display().to_string(), e))?;
    let mut subdirs = Vec::new();
    for de in rd {
        let de = de.map_err(|e| CkError::Io(dir.display().to_string(), e))?;
        let full = de.path();
        let name = utf8_name(&de.file_name(), &full)?;
        // fstatat(dirfd, name, AT_SYMLINK_NOFOLLOW) (std on Linux): no path walk per entry.
        let md = match de.metadata() {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // deleted meanwhile
            Err(e) => return Err(CkError::Io(full.display().to_string(), e)),
        };
        let path = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let ft = md.file_type();
        let (kind, link) = if ft.is_file() {
            ("file", None)
        } else if ft.is_dir() {
            subdirs.push(path.clone());
            ("dir", None)
        } else if ft.is_symlink() {
            let target = match fs::read_link(&full) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(CkError::Io(full.display().to_string(), e)),
            };
            ("symlink", Some(utf8_name(target.as_os_str(), &full)?))
        } else {
            continue; // sockets, FIFOs, devices: not part of a session checkpoint
        };
        out.push((
            path,
            kind,
            if kind == "file" { md.size() } else { 0 },
            md.mode() & 0o7777,
            ns(md.mtime(), md.mtime_nsec()),
            ns(md.ctime(), md.ctime_nsec()),
            md.ino(),
            md.dev(),
            link,
        ));
    }
    let nested: Result<Vec<Vec<ScanEntry>>, CkError> = subdirs
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

/// Every entry below `root` (not `root` itself), sorted by path bytes; symlinks never followed.
pub fn scan(root: &Path) -> Result<Vec<ScanEntry>, CkError> {
    let md = fs::symlink_metadata(root).map_err(|e| CkError::Io(root.display().to_string(), e))?;
    if !md.is_dir() {
        return Err(CkError::Invalid(format!(
            "not a directory: {}",
            root.display()
        )));
    }
    let mut out = Vec::new();
    scan_dir(root, "", &mut out)?;
    out.par_sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(out)
}

// -- tar members ---------------------------------------------------------------------------

const USTAR_MAX_OCTAL: u64 = 0o77777777777;

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    // "<len> <key>=<value>\n" where <len> counts the whole record, itself included
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len.to_string().len() + rest > len {
        len += 1;
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

fn set_raw(field: &mut [u8], value: &[u8]) {
    let mut n = value.len().min(field.len());
    while n > 0 && std::str::from_utf8(&value[..n]).is_err() {
        n -= 1;
    }
    field.fill(0);
    field[..n].copy_from_slice(&value[..n]);
}

fn pad(out: &mut Vec<u8>) {
    let rem = out.len() % 512;
    if rem != 0 {
        out.resize(out.len() + 512 - rem, 0);
    }
}

/// The header block(s) of one tar member (a PAX extended header first when the name, link
/// target, size or nanosecond mtime do not fit ustar), appended to `out`. Owner is 0:0.
pub fn member_header(
    out: &mut Vec<u8>,
    path: &str,
    kind: &str,
    mode: u32,
    mtime_ns: i64,
    size: u64,
    link: Option<&str>,
) -> Result<(), CkError> {
    let (etype, name) = match kind {
        "file" => (tar::EntryType::Regular, path.to_owned()),
        "dir" => (tar::EntryType::Directory, format!("{path}/")),
        "symlink" => (tar::EntryType::Symlink, path.to_owned()),
        other => {
            return Err(CkError::Invalid(format!(
                "{path:?}: unknown kind {other:?}"
            )))
        }
    };
    let mut pax: Vec<u8> = Vec::new();
    if let Some(t) = link {
        if t.len() > 100 || !t.is_ascii() {
            pax.extend(pax_record("linkpath", t.as_bytes()));
        }
    }
    let secs = mtime_ns.div_euclid(1_000_000_000);
    let frac = mtime_ns.rem_euclid(1_000_000_000);
    if frac != 0 || secs < 0 || secs as u64 > USTAR_MAX_OCTAL {
        let sign = if mtime_ns < 0 { "-" } else { "" };
        let abs = mtime_ns.unsigned_abs();
        let v = format!("{sign}{}.{:09}", abs / 1_000_000_000, abs % 1_000_000_000);
        pax.extend(pax_record("mtime", v.as_bytes()));
    }
    if name.len() > 100 || !name.is_ascii() {
        pax.extend(pax_record("path", name.as_bytes()));
    }
    if size > USTAR_MAX_OCTAL {
        pax.extend(pax_record("size", size.to_string().as_bytes()));
    }
    if !pax.is_empty() {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        if let Some(u) = h.as_ustar_mut() {
            set_raw(&mut u.name, b"././@PaxHeader");
        }
        h.set_size(pax.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&pax);
        pad(out);
    }
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(etype);
    if let Some(u) = h.as_ustar_mut() {
        set_raw(&mut u.name, name.as_bytes());
        if let Some(t) = link {
            set_raw(&mut u.linkname, t.as_bytes());
        }
    }
    h.set_size(size.min(USTAR_MAX_OCTAL));
    h.set_mode(mode & 0o7777);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(secs.clamp(0, USTAR_MAX_OCTAL as i64) as u64);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    Ok(())
}

// -- packing -------------------------------------------------------------------------------

/// What `pack` recorded for one file (None if it vanished or was swapped since the scan).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packed {
    pub digest: String,
    pub size: u64,
    pub mode: u32,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub frame_off: u64,
    pub frame_len: u64,
    pub data_off: u64,
}

struct Loaded {
    data: Vec<u8>,
    digest: String,
    mode: u32,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
}

/// Open `root/path` without following a final symlink and check it is the scanned inode; read
/// it whole. None when it is gone, is no longer a regular file, or is another inode.
fn load(root: &Path, path: &str, dev: u64, ino: u64) -> Result<Option<Loaded>, CkError> {
    let full = root.join(path);
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&full)
    {
        Ok(f) => f,
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                || matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(CkError::Io(full.display().to_string(), e)),
    };
    let md = file
        .metadata()
        .map_err(|e| CkError::Io(full.display().to_string(), e))?;
    if !md.is_file() || md.dev() != dev || md.ino() != ino {
        return Ok(None);
    }
    let mut data = Vec::with_capacity(md.size() as usize);
    (&file)
        .read_to_end(&mut data)
        .map_err(|e| CkError::Io(full.display().to_string(), e))?;
    let mut h = StreamHasher::new(Algorithm::Sha256);
    h.update(&data);
    Ok(Some(Loaded {
        data,
        digest: h.digest_string(),
        mode: md.mode() & 0o7777,
        mtime_ns: ns(md.mtime(), md.mtime_nsec()),
        ctime_ns: ns(md.ctime(), md.ctime_nsec()),
        ino: md.ino(),
    }))
}

/// Pack `files` ((path, dev, ino), in the order wanted in the pack) from `root`. Returns the
/// pack bytes and one record per input file.
pub fn pack(
    root: &Path,
    files: &[(String, u64, u64)],
    group_bytes: usize,
    level: i32,
) -> Result<(Vec<u8>, Vec<Option<Packed>>), CkError> {
    let loaded: Vec<Option<Loaded>> = files
        .par_iter()
        .map(|(p, dev, ino)| load(root, p, *dev, *ino))
        .collect::<Result<_, _>>()?;
    // Cut the tar stream into groups at member boundaries.
    struct Group {
        tar: Vec<u8>,
        members: Vec<(usize, u64)>, // (file index, body offset in the group)
    }
    let mut groups: Vec<Group> = Vec::new();
    let mut cur = Group {
        tar: Vec::new(),
        members: Vec::new(),
    };
    for (i, l) in loaded.iter().enumerate() {
        let Some(l) = l else { continue };
        let need = l.data.len() + 1536;
        if !cur.members.is_empty() && cur.tar.len() + need > group_bytes {
            groups.push(std::mem::replace(
                &mut cur,
                Group {
                    tar: Vec::new(),
                    members: Vec::new(),
                },
            ));
        }
        member_header(
            &mut cur.tar,
            &files[i].0,
            "file",
            l.mode,
            l.mtime_ns,
            l.data.len() as u64,
            None,
        )?;
        cur.members.push((i, cur.tar.len() as u64));
        cur.tar.extend_from_slice(&l.data);
        pad(&mut cur.tar);
    }
    cur.tar.extend_from_slice(&[0u8; 1024]); // end of archive, in the last frame
    groups.push(cur);
    let frames: Vec<Vec<u8>> = groups
        .par_iter()
        .map(|g| zstd::bulk::compress(&g.tar, level))
        .collect::<io::Result<_>>()
        .map_err(|e| CkError::Io("zstd".into(), e))?;
    let mut out = Vec::with_capacity(frames.iter().map(Vec::len).sum());
    let mut records: Vec<Option<Packed>> = vec![None; files.len()];
    for (g, frame) in groups.iter().zip(&frames) {
        let off = out.len() as u64;
        out.extend_from_slice(frame);
        for &(i, data_off) in &g.members {
            if let Some(l) = &loaded[i] {
                records[i] = Some(Packed {
                    digest: l.digest.clone(),
                    size: l.data.len() as u64,
                    mode: l.mode,
                    mtime_ns: l.mtime_ns,
                    ctime_ns: l.ctime_ns,
                    ino: l.ino,
                    frame_off: off,
                    frame_len: frame.len() as u64,
                    data_off,
                });
            }
        }
    }
    Ok((out, records))
}

// -- reading -------------------------------------------------------------------------------

/// Decompress one frame, producing at most `limit` bytes (a frame claiming more is refused).
pub fn decompress_frame(frame: &[u8], limit: u64) -> Result<Vec<u8>, CkError> {
    let mut dec = zstd::stream::read::Decoder::with_buffer(frame)
        .map_err(|e| CkError::Io("zstd".into(), e))?
        .single_frame();
    let mut out = Vec::new();
    (&mut dec)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| CkError::Digest(format!("pack frame does not decompress: {e}")))?;
    Ok(out)
}

fn verify(body: &[u8], digest: &str, what: &str) -> Result<(), CkError> {
    let (alg, _) = crate::digest::validate_digest(digest).map_err(CkError::Unsafe)?;
    let mut h = StreamHasher::new(alg);
    h.update(body);
    let got = h.digest_string();
    if got != digest {
        return Err(CkError::Digest(format!(
            "{what}: content hashes to {got}, index says {digest}"
        )));
    }
    Ok(())
}

/// The body at `data_off..data_off+size` of a decompressed frame, checked against `digest`.
pub fn slice_body<'a>(
    plain: &'a [u8],
    data_off: u64,
    size: u64,
    digest: &str,
    what: &str,
) -> Result<&'a [u8], CkError> {
    let end = data_off
        .checked_add(size)
        .filter(|&e| e <= plain.len() as u64)
        .ok_or_else(|| {
            CkError::Unsafe(format!(
                "{what}: location {data_off}+{size} lies outside its pack frame ({} bytes)",
                plain.len()
            ))
        })?;
    let body = &plain[data_off as usize..end as usize];
    verify(body, digest, what)?;
    Ok(body)
}

// -- restore layers ------------------------------------------------------------------------

const RAW_BLOCK: usize = 128 * 1024;

/// Writes bytes as one zstd frame of raw (stored, not compressed) blocks, so the layer unpacker
/// reads them at memory speed: frame header (no checksum, 128 KiB window), blocks of at most
/// 128 KiB, then an empty last block.
pub struct RawFramer {
    out: Vec<u8>,
    /// Where the open block's 3-byte header sits, and how much data it has.
    header_at: usize,
    in_block: usize,
}

impl RawFramer {
    pub fn with_capacity(data: usize) -> Self {
        let mut out = Vec::with_capacity(data + data / RAW_BLOCK * 3 + 16);
        out.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x38]);
        RawFramer {
            out,
            header_at: usize::MAX,
            in_block: 0,
        }
    }

    fn close_block(&mut self) {
        if self.header_at != usize::MAX {
            let hdr = (self.in_block as u32) << 3; // not last, type 0 (raw)
            self.out[self.header_at..self.header_at + 3].copy_from_slice(&hdr.to_le_bytes()[..3]);
            self.header_at = usize::MAX;
        }
    }

    pub fn write(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.header_at == usize::MAX || self.in_block == RAW_BLOCK {
                self.close_block();
                self.header_at = self.out.len();
                self.out.extend_from_slice(&[0, 0, 0]);
                self.in_block = 0;
            }
            let n = data.len().min(RAW_BLOCK - self.in_block);
            self.out.extend_from_slice(&data[..n]);
            self.in_block += n;
            data = &data[n..];
        }
    }

    pub fn zeros(&mut self, n: usize) {
        const Z: [u8; 1024] = [0u8; 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(Z.len());
            self.write(&Z[..k]);
            left -= k;
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.close_block();
        self.out.extend_from_slice(&[1, 0, 0]); // empty last block
        self.out
    }
}

/// `tar` as one raw-block zstd frame.
pub fn raw_frame(tar: &[u8]) -> Vec<u8> {
    let mut f = RawFramer::with_capacity(tar.len());
    f.write(tar);
    f.finish()
}

/// One entry of a restore layer: (path, kind, mode, mtime_ns, size, digest, link target,
/// source) with source = (range index, frame offset in the range, frame length, body offset).
pub type LayerItem = (
    String,
    String,
    u32,
    i64,
    u64,
    Option<String>,
    Option<String>,
    Option<(usize, u64, u64, u64)>,
);

/// Build the tar (raw zstd frame) for `items`, taking file bodies from the frames of `ranges`.
/// Every body is verified against its digest; every location must lie inside its range/frame.
pub fn synth_layer(
    items: &[LayerItem],
    ranges: &[&[u8]],
    max_frame: u64,
) -> Result<Vec<u8>, CkError> {
    // Decompress each distinct frame once, in parallel.
    let mut keys: Vec<(usize, u64, u64)> = items
        .iter()
        .filter_map(|it| it.7.map(|(r, fo, fl, _)| (r, fo, fl)))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let plains: Vec<Vec<u8>> = keys
        .par_iter()
        .map(|&(r, fo, fl)| {
            let range = ranges
                .get(r)
                .ok_or_else(|| CkError::Unsafe(format!("restore: no fetched range {r}")))?;
            let end = fo
                .checked_add(fl)
                .filter(|&e| e <= range.len() as u64 && fl > 0)
                .ok_or_else(|| {
                    CkError::Unsafe(format!(
                        "frame {fo}+{fl} lies outside its pack (range of {} bytes)",
                        range.len()
                    ))
                })?;
            decompress_frame(&range[fo as usize..end as usize], max_frame)
        })
        .collect::<Result<_, _>>()?;
    let frame_of: HashMap<(usize, u64, u64), usize> =
        keys.iter().enumerate().map(|(i, k)| (*k, i)).collect();
    // Verify bodies in parallel.
    let bodies: Vec<Option<&[u8]>> = items
        .par_iter()
        .map(|it| match (&it.7, &it.5) {
            (Some((r, fo, fl, off)), Some(d)) => {
                let plain = &plains[frame_of[&(*r, *fo, *fl)]];
                slice_body(plain, *off, it.4, d, &it.0).map(Some)
            }
            (Some(_), None) => Err(CkError::Unsafe(format!(
                "{:?}: file without a digest",
                it.0
            ))),
            _ => Ok(None),
        })
        .collect::<Result<_, _>>()?;
    let data: usize = bodies.iter().map(|b| b.map_or(0, <[u8]>::len) + 2048).sum();
    let mut out = RawFramer::with_capacity(data + 1024);
    let mut header = Vec::with_capacity(2048);
    for (it, body) in items.iter().zip(bodies) {
        let size = body.map_or(0, |b| b.len() as u64);
        header.clear();
        member_header(&mut header, &it.0, &it.1, it.2, it.3, size, it.6.as_deref())?;
        out.write(&header);
        if let Some(b) = body {
            out.write(b);
            out.zeros((512 - b.len() % 512) % 512);
        }
    }
    out.zeros(1024);
    Ok(out.finish())
}

// -- Python bindings -------------------------------------------------------------------------

/// Scan a checkpoint directory: sorted (path, kind, size, mode, mtime_ns, ctime_ns, ino, dev,
/// link target) for every file, directory and symlink below `root`.
#[pyfunction]
fn checkpoint_scan(py: Python<'_>, root: std::path::PathBuf) -> PyResult<Vec<ScanEntry>> {
    Ok(py.allow_threads(|| scan(&root))?)
}

type PackedTuple = (String, u64, u32, i64, i64, u64, u64, u64, u64);

/// Pack files into a framed tar+zstd pack: (pack bytes, per file (digest, size, mode, mtime_ns,
/// ctime_ns, ino, frame_off, frame_len, data_off) or None if it vanished or was swapped).
#[pyfunction]
#[pyo3(signature = (root, files, group_bytes = 262144, level = 3))]
fn checkpoint_pack<'py>(
    py: Python<'py>,
    root: std::path::PathBuf,
    files: Vec<(String, u64, u64)>,
    group_bytes: usize,
    level: i32,
) -> PyResult<(Bound<'py, PyBytes>, Vec<Option<PackedTuple>>)> {
    let (data, recs) = py.allow_threads(|| pack(&root, &files, group_bytes.max(4096), level))?;
    let recs = recs
        .into_iter()
        .map(|r| {
            r.map(|p| {
                (
                    p.digest,
                    p.size,
                    p.mode,
                    p.mtime_ns,
                    p.ctime_ns,
                    p.ino,
                    p.frame_off,
                    p.frame_len,
                    p.data_off,
                )
            })
        })
        .collect();
    Ok((PyBytes::new(py, &data), recs))
}

/// One file out of a fetched frame: decompress (at most `max_frame` bytes), slice, verify.
#[pyfunction]
#[pyo3(signature = (frame, data_off, size, digest, path, max_frame = 1 << 30))]
fn checkpoint_extract<'py>(
    py: Python<'py>,
    frame: &[u8],
    data_off: u64,
    size: u64,
    digest: &str,
    path: &str,
    max_frame: u64,
) -> PyResult<Bound<'py, PyBytes>> {
    let body = py.allow_threads(|| -> Result<Vec<u8>, CkError> {
        let plain = decompress_frame(frame, max_frame.min(data_off.saturating_add(size)))?;
        slice_body(&plain, data_off, size, digest, path).map(<[u8]>::to_vec)
    })?;
    Ok(PyBytes::new(py, &body))
}

/// A restore layer (raw zstd frame of a tar) for `items`, bodies from the fetched `ranges`.
#[pyfunction]
#[pyo3(signature = (items, ranges, max_frame = 1 << 30))]
fn checkpoint_layer<'py>(
    py: Python<'py>,
    items: Vec<LayerItem>,
    ranges: Vec<pyo3::pybacked::PyBackedBytes>,
    max_frame: u64,
) -> PyResult<Bound<'py, PyBytes>> {
    let out = py.allow_threads(|| {
        let refs: Vec<&[u8]> = ranges.iter().map(|r| &r[..]).collect();
        synth_layer(&items, &refs, max_frame)
    })?;
    Ok(PyBytes::new(py, &out))
}

/// The header block(s) of one tar member (owner 0:0), for streaming a large file into a layer.
#[pyfunction]
#[pyo3(signature = (path, kind, mode, mtime_ns, size, link = None))]
fn checkpoint_member_header<'py>(
    py: Python<'py>,
    path: &str,
    kind: &str,
    mode: u32,
    mtime_ns: i64,
    size: u64,
    link: Option<&str>,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut out = Vec::new();
    member_header(&mut out, path, kind, mode, mtime_ns, size, link)?;
    Ok(PyBytes::new(py, &out))
}

/// zstd-compress a small buffer (checkpoint indexes).
#[pyfunction]
#[pyo3(signature = (data, level = 3))]
fn zstd_compress<'py>(py: Python<'py>, data: &[u8], level: i32) -> PyResult<Bound<'py, PyBytes>> {
    let out = py
        .allow_threads(|| zstd::bulk::compress(data, level))
        .map_err(|e| PyOSError::new_err(format!("zstd: {e}")))?;
    Ok(PyBytes::new(py, &out))
}

/// Decompress a zstd buffer, refusing output past `limit` bytes (ValueError).
#[pyfunction]
#[pyo3(signature = (data, limit))]
fn zstd_decompress<'py>(py: Python<'py>, data: &[u8], limit: u64) -> PyResult<Bound<'py, PyBytes>> {
    let out = py.allow_threads(|| -> Result<Vec<u8>, String> {
        let mut dec = zstd::stream::read::Decoder::with_buffer(data).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        (&mut dec)
            .take(limit.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(|e| e.to_string())?;
        if out.len() as u64 > limit {
            return Err(format!("decompresses past {limit} bytes"));
        }
        Ok(out)
    });
    let out = out.map_err(|e| PyValueError::new_err(format!("zstd: {e}")))?;
    Ok(PyBytes::new(py, &out))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(checkpoint_scan, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint_pack, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint_extract, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint_layer, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint_member_header, m)?)?;
    m.add_function(wrap_pyfunction!(zstd_compress, m)?)?;
    m.add_function(wrap_pyfunction!(zstd_decompress, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        let r = t.path();
        fs::create_dir_all(r.join("a/b")).expect("mkdir");
        for i in 0..40 {
            fs::write(r.join(format!("a/f{i}")), format!("{i}").repeat(i * 500)).expect("write");
        }
        fs::write(r.join(format!("a/b/{}", "n".repeat(150))), b"long").expect("write");
        std::os::unix::fs::symlink("../x", r.join("a/l")).expect("symlink");
        t
    }

    #[test]
    fn pack_is_one_tar_zstd_stream_and_each_file_reads_alone() {
        let t = tree();
        let entries = scan(t.path()).expect("scan");
        let files: Vec<(String, u64, u64)> = entries
            .iter()
            .filter(|e| e.1 == "file")
            .map(|e| (e.0.clone(), e.7, e.6))
            .collect();
        let (pack_bytes, recs) = pack(t.path(), &files, 8192, 3).expect("pack");
        // the whole pack is one tar+zstd stream with every file
        let tar_bytes = zstd::stream::decode_all(pack_bytes.as_slice()).expect("decode");
        let mut ar = tar::Archive::new(tar_bytes.as_slice());
        let mut n = 0;
        for e in ar.entries().expect("entries") {
            let mut e = e.expect("entry");
            let p = String::from_utf8(e.path_bytes().into_owned()).expect("utf8");
            let mut body = Vec::new();
            e.read_to_end(&mut body).expect("read");
            assert_eq!(body, fs::read(t.path().join(&p)).expect("read"), "{p}");
            n += 1;
        }
        assert_eq!(n, files.len());
        assert!(
            recs.iter()
                .map(|r| r.as_ref().map(|p| p.frame_off))
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 3
        );
        // each file alone from its frame
        for ((p, _, _), r) in files.iter().zip(&recs) {
            let r = r.as_ref().expect("packed");
            let frame = &pack_bytes[r.frame_off as usize..(r.frame_off + r.frame_len) as usize];
            let plain = decompress_frame(frame, 1 << 30).expect("frame");
            let body = slice_body(&plain, r.data_off, r.size, &r.digest, p).expect("body");
            assert_eq!(body, fs::read(t.path().join(p)).expect("read"));
            // a location past the frame is refused, a wrong digest too
            assert!(matches!(
                slice_body(
                    &plain,
                    r.data_off + plain.len() as u64,
                    r.size,
                    &r.digest,
                    p
                ),
                Err(CkError::Unsafe(_))
            ));
        }
    }

    #[test]
    fn swapped_file_is_skipped() {
        let t = tree();
        let entries = scan(t.path()).expect("scan");
        let f0 = entries.iter().find(|e| e.0 == "a/f1").expect("f1");
        fs::remove_file(t.path().join("a/f1")).expect("rm");
        std::os::unix::fs::symlink("/etc/hostname", t.path().join("a/f1")).expect("symlink");
        let (_, recs) = pack(t.path(), &[(f0.0.clone(), f0.7, f0.6)], 8192, 3).expect("pack");
        assert_eq!(recs, vec![None]);
    }

    #[test]
    fn raw_frame_decodes() {
        for n in [0usize, 1, 131072, 131073, 400_000] {
            let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let f = raw_frame(&data);
            assert_eq!(
                zstd::stream::decode_all(f.as_slice()).expect("decode"),
                data
            );
        }
    }

    #[test]
    fn pax_record_lengths() {
        for v in [0usize, 5, 89, 90, 91, 995, 996, 1000] {
            let r = pax_record("path", "x".repeat(v).as_bytes());
            let len: usize =
                std::str::from_utf8(&r[..r.iter().position(|&b| b == b' ').expect("space")])
                    .expect("utf8")
                    .parse()
                    .expect("num");
            assert_eq!(len, r.len());
        }
    }
}
