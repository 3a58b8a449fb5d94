//! Pack a scanned tree (or the changed part of it, plus whiteouts) into a tar+zstd layer in one
//! pass, hashing the compressed stream (blob digest) and the tar stream (diff_id) as they are
//! written.
//!
//! Pipeline: the members are cut into batches of consecutive small files (up to `TAR_BUFFER` of
//! framed tar each); reader threads frame a whole batch (PAX record when needed, ustar header,
//! body read with one `read` into the batch buffer, padding) into one pooled buffer, which goes
//! to the diff_id hasher and the compressor as one chunk: no per-file allocation, channel
//! message or copy. Large files stream straight from disk on the writer thread. Entries are in
//! index order, headers carry only what `scan` recorded (no atime, no user names), so the same
//! tree gives the same bytes whatever the batching or the thread counts.
//!
//! Safety: every file is opened relative to its directory's handle, each path component with
//! `O_NOFOLLOW` (`fsys::DirCache`), and the opened inode must be the scanned one (device, inode,
//! type, size): a file replaced after the scan, by a symlink or anything else, fails the pack
//! ("changed while packing") instead of reading what the link points at.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::{bounded, Receiver, Sender};
use tar::{EntryType, Header};

use super::chunks::{Pool, Shared};
use super::encoder::LayerEncoder;
use super::fsys::{self, c_name, Dir, DirCache};
use super::index::{Entry, Kind, ROOT};
use crate::digest::{Algorithm, StreamHasher};

/// Files whose framed member is up to this size are read in batches by the reader threads;
/// larger ones stream from disk on the writer thread.
pub const PRELOAD_MAX: u64 = 256 * 1024;
/// How many batches the readers may run ahead of the writer.
pub const READ_WINDOW: usize = 16;
/// Marker of an opaque directory (OCI image spec, layer whiteouts).
pub const OPAQUE: &str = ".wh..wh..opq";
pub const WHITEOUT_PREFIX: &str = ".wh.";

#[derive(Clone, Debug)]
pub struct PackOptions {
    pub level: i32,
    /// zstd worker threads (at least 1: multithreaded zstd output does not depend on the count).
    pub threads: u32,
    /// File reader threads.
    pub readers: usize,
    /// Algorithm of the blob digest (the diff_id is always sha256, as OCI defines it).
    pub algorithm: Algorithm,
}

impl Default for PackOptions {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        PackOptions {
            level: 3,
            threads: cpus as u32,
            readers: cpus.clamp(2, 8),
            algorithm: Algorithm::Sha256,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackResult {
    /// `algorithm:hex` of the compressed layer (its blob digest).
    pub digest: String,
    /// `sha256:hex` of the uncompressed tar.
    pub diff_id: String,
    pub size: u64,
    pub uncompressed_size: u64,
    pub entries: u64,
    pub files: u64,
    pub file_bytes: u64,
}

/// Live counters for progress bars.
#[derive(Default, Debug)]
pub struct PackProgress {
    pub entries: AtomicU64,
    pub files: AtomicU64,
    pub bytes: AtomicU64,
}

#[derive(Debug)]
pub struct PackError(pub String, pub io::Error);

impl std::fmt::Display for PackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.0, self.1)
    }
}

impl std::error::Error for PackError {}

fn ctx(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> PackError {
    move |e| PackError(what.to_string(), e)
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    pub inner: W,
    pub hasher: StreamHasher,
    pub count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W, algorithm: Algorithm) -> Self {
        HashingWriter {
            inner,
            hasher: StreamHasher::new(algorithm),
            count: 0,
        }
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What goes into a layer, in order.
enum Item<'a> {
    Entry(&'a Entry),
    /// `.wh.<name>` hiding a path of a lower layer.
    Whiteout(String),
    /// `<dir>/.wh..wh..opq` hiding everything below `dir` in lower layers.
    Opaque(String),
}

impl<'a> Item<'a> {
    fn tar_path(&self) -> Cow<'a, str> {
        match self {
            Item::Entry(e) => Cow::Borrowed(e.path.as_str()),
            Item::Whiteout(p) => Cow::Owned(match p.rfind('/') {
                Some(i) => format!("{}/{WHITEOUT_PREFIX}{}", &p[..i], &p[i + 1..]),
                None => format!("{WHITEOUT_PREFIX}{p}"),
            }),
            Item::Opaque(d) if d == ROOT => Cow::Borrowed(OPAQUE),
            Item::Opaque(d) => Cow::Owned(format!("{d}/{OPAQUE}")),
        }
    }
}

fn sort_key(p: &str) -> &[u8] {
    if p == ROOT {
        b""
    } else {
        p.as_bytes()
    }
}

/// One planned tar member.
struct Plan<'a> {
    item: Item<'a>,
    name: Cow<'a, str>,
    /// For the second and later names of a hardlinked file: the first name in this layer.
    link_to: Option<Cow<'a, str>>,
    /// An upper bound of the member's framed size (PAX record, header, body, padding).
    framed: u64,
}

impl Plan<'_> {
    /// A regular file whose body is read from disk.
    fn reads(&self) -> Option<&Entry> {
        match &self.item {
            Item::Entry(e) if e.kind == Kind::File && self.link_to.is_none() => Some(e),
            _ => None,
        }
    }
}

fn pad512(n: u64) -> u64 {
    n.div_ceil(512) * 512
}

fn framed_bound(name: &str, link: Option<&str>, body: u64) -> u64 {
    // header + body; a PAX member (header + records) when any field needs one: path, linkpath
    // and three short records at most
    let records = name.len() as u64 + link.map_or(0, |l| l.len() as u64) + 128;
    512 + pad512(body) + 512 + pad512(records)
}

fn plan<'a>(entries: &[&'a Entry], whiteouts: &[String], opaque: &[String]) -> Vec<Plan<'a>> {
    let mut items: Vec<Item<'a>> = entries.iter().map(|e| Item::Entry(e)).collect();
    items.extend(whiteouts.iter().map(|p| Item::Whiteout(p.clone())));
    items.extend(opaque.iter().map(|d| Item::Opaque(d.clone())));
    let mut named: Vec<(Cow<'a, str>, Item<'a>)> =
        items.into_iter().map(|i| (i.tar_path(), i)).collect();
    // Opaque markers right after their directory and before its children (key `dir/\0`: names
    // never contain NUL), so that simple unpackers apply them before the new content; everything
    // else in path order. Entries come sorted: only deltas with markers need the sort.
    if !whiteouts.is_empty() || !opaque.is_empty() {
        named.sort_by_cached_key(|(name, item)| match item {
            Item::Opaque(d) if d == ROOT => vec![0u8],
            Item::Opaque(d) => [d.as_bytes(), b"/\0"].concat(),
            _ => sort_key(name).to_vec(),
        });
    }
    let mut first_name: HashMap<(u64, u64), Cow<'a, str>> = HashMap::new();
    named
        .into_iter()
        .map(|(name, item)| {
            let mut link_to = None;
            let mut body = 0;
            let mut link: Option<&str> = None;
            if let Item::Entry(e) = &item {
                if e.is_hardlinked() {
                    match first_name.get(&(e.dev, e.ino)) {
                        Some(first) => link_to = Some(first.clone()),
                        None => {
                            first_name.insert((e.dev, e.ino), name.clone());
                        }
                    }
                }
                if e.kind == Kind::File && link_to.is_none() {
                    body = e.size;
                }
                link = e.link.as_deref();
            }
            let framed = framed_bound(&name, link.or(link_to.as_deref()), body);
            Plan {
                item,
                name,
                link_to,
                framed,
            }
        })
        .collect()
}

fn changed(expected: u64, got: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("file changed while packing (scanned {expected} bytes, read {got})"),
    )
}

/// Open the regular file of `e` relative to its directory (no symlink followed on the way) and
/// check that it is the inode the scan recorded.
pub(super) fn open_checked(dirs: &mut DirCache<'_>, e: &Entry) -> io::Result<File> {
    let (parent, name) = match e.path.rfind('/') {
        Some(i) => (&e.path[..i], &e.path[i + 1..]),
        None => (ROOT, e.path.as_str()),
    };
    let swapped = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("file changed while packing ({what})"),
        )
    };
    let dir = dirs.get(parent).map_err(|err| match err.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => swapped("a parent directory was replaced"),
        Some(libc::ENOENT) => swapped("a parent directory was deleted"),
        _ => err,
    })?;
    let f = dir
        .open_file(&c_name(name.as_bytes())?)
        .map_err(|err| match err.raw_os_error() {
            Some(libc::ELOOP) => swapped("replaced by a symlink"),
            Some(libc::ENOENT) => swapped("deleted"),
            _ => err,
        })?;
    let st = fsys::fstat(std::os::fd::AsRawFd::as_raw_fd(&f))?;
    if fsys::file_type(&st) != libc::S_IFREG {
        return Err(swapped("not a regular file any more"));
    }
    if st.st_dev != e.dev || st.st_ino != e.ino {
        return Err(swapped("another inode than the scanned one"));
    }
    if st.st_size as u64 != e.size {
        return Err(changed(e.size, st.st_size as u64));
    }
    Ok(f)
}

/// Reads exactly `size` bytes of a file, failing if it has shrunk or grown meanwhile.
struct ExactFile {
    file: File,
    left: u64,
    size: u64,
}

impl Read for ExactFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            let mut probe = [0u8; 1];
            return match self.file.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(changed(self.size, self.size + 1)),
            };
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(changed(self.size, self.size - self.left));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Read the whole body of a small file into `out` (which has room for `size + 1` bytes): one
/// `read` when the file is as scanned (a short read of a regular file is its end).
fn read_body(f: &mut File, out: &mut [u8], size: usize) -> io::Result<()> {
    let mut got = 0usize;
    loop {
        let n = match f.read(&mut out[got..=size]) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => other?,
        };
        if n == 0 {
            break;
        }
        got += n;
        if got > size {
            return Err(changed(size as u64, got as u64));
        }
        if got == size {
            // a regular file's read stops short only at its end
            break;
        }
    }
    if got != size {
        return Err(changed(size as u64, got as u64));
    }
    Ok(())
}

const USTAR_MAX_OCTAL: u64 = 0o77777777777;
const USTAR_MAX_ID: u64 = 0o7777777;

fn set_name_raw(field: &mut [u8], value: &[u8]) {
    // The PAX record carries the real name; the header keeps a prefix (cut on a UTF-8 boundary).
    let mut n = value.len().min(field.len());
    while n > 0 && std::str::from_utf8(&value[..n]).is_err() {
        n -= 1;
    }
    field.fill(0);
    field[..n].copy_from_slice(&value[..n]);
}

/// Append one PAX record (`"<len> key=value\n"`, the length counting itself) to `data`.
fn pax_record(data: &mut Vec<u8>, key: &str, value: &[u8]) {
    let rest = 3 + key.len() + value.len();
    let mut len_len = 1;
    let mut max = 10;
    while rest + len_len >= max {
        len_len += 1;
        max *= 10;
    }
    let _ = write!(data, "{} {key}=", rest + len_len);
    data.extend_from_slice(value);
    data.push(b'\n');
}

/// The framing of one member: its ustar header and, when a field does not fit ustar, the PAX
/// records (sorted by key) of a preceding extended header. `records` is scratch space reused
/// between members (cleared here).
fn header_for(
    e: Option<&Entry>,
    name: &str,
    kind: EntryType,
    size: u64,
    link: Option<&str>,
    records: &mut Vec<u8>,
) -> io::Result<Header> {
    records.clear();
    let mut h = Header::new_ustar();
    let dir_name;
    let tar_name: &str = if kind == EntryType::Directory {
        dir_name = if name == ROOT {
            "./".to_owned()
        } else {
            format!("{name}/")
        };
        &dir_name
    } else {
        name
    };
    // records in key order: gid, linkpath, mtime, path, size, uid
    let mut mtime_rec: Option<i64> = None;
    let (mut gid_rec, mut uid_rec) = (None, None);
    if let Some(u) = h.as_ustar_mut() {
        set_name_raw(&mut u.name, tar_name.as_bytes());
        if let Some(target) = link {
            set_name_raw(&mut u.linkname, target.as_bytes());
        }
    }
    h.set_entry_type(kind);
    h.set_size(size);
    match e {
        Some(e) => {
            h.set_mode(e.mode);
            if u64::from(e.uid) > USTAR_MAX_ID {
                uid_rec = Some(e.uid);
            }
            if u64::from(e.gid) > USTAR_MAX_ID {
                gid_rec = Some(e.gid);
            }
            h.set_uid(u64::from(e.uid).min(USTAR_MAX_ID));
            h.set_gid(u64::from(e.gid).min(USTAR_MAX_ID));
            let secs = e.mtime_ns.div_euclid(1_000_000_000);
            if e.mtime_ns.rem_euclid(1_000_000_000) != 0
                || secs < 0
                || secs as u64 > USTAR_MAX_OCTAL
            {
                mtime_rec = Some(e.mtime_ns);
            }
            h.set_mtime(secs.clamp(0, USTAR_MAX_OCTAL as i64) as u64);
            if matches!(e.kind, Kind::Char | Kind::Block) {
                let major = libc::major(e.rdev as libc::dev_t);
                let minor = libc::minor(e.rdev as libc::dev_t);
                h.set_device_major(major)?;
                h.set_device_minor(minor)?;
            }
        }
        None => {
            // whiteout markers: fixed metadata, so deltas are deterministic too
            h.set_mode(0o600);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
        }
    }
    let mut num = [0u8; 24];
    if let Some(g) = gid_rec {
        pax_record(records, "gid", fmt_u64(&mut num, u64::from(g)));
    }
    if let Some(target) = link {
        if target.len() > 100 || !target.is_ascii() {
            pax_record(records, "linkpath", target.as_bytes());
        }
    }
    if let Some(ns) = mtime_rec {
        let mut t = [0u8; 32];
        let n = fmt_pax_time(&mut t, ns);
        pax_record(records, "mtime", &t[..n]);
    }
    if tar_name.len() > 100 || !tar_name.is_ascii() {
        pax_record(records, "path", tar_name.as_bytes());
    }
    if size > USTAR_MAX_OCTAL {
        pax_record(records, "size", fmt_u64(&mut num, size));
    }
    if let Some(u) = uid_rec {
        pax_record(records, "uid", fmt_u64(&mut num, u64::from(u)));
    }
    h.set_cksum();
    Ok(h)
}

fn fmt_u64(buf: &mut [u8; 24], mut v: u64) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

/// `[-]secs.nnnnnnnnn` into `out`; returns its length.
fn fmt_pax_time(out: &mut [u8; 32], ns: i64) -> usize {
    let abs = ns.unsigned_abs();
    let mut num = [0u8; 24];
    let secs = fmt_u64(&mut num, abs / 1_000_000_000);
    let mut n = 0;
    if ns < 0 {
        out[0] = b'-';
        n = 1;
    }
    out[n..n + secs.len()].copy_from_slice(secs);
    n += secs.len();
    out[n] = b'.';
    n += 1;
    let mut frac = abs % 1_000_000_000;
    for i in (0..9).rev() {
        out[n + i] = b'0' + (frac % 10) as u8;
        frac /= 10;
    }
    n + 9
}

/// The PAX extended header preceding a member with `records` (empty: none).
fn pax_header(records: &[u8]) -> Header {
    let mut h = Header::new_ustar();
    h.set_size(records.len() as u64);
    h.set_entry_type(EntryType::XHeader);
    h.set_cksum();
    h
}

/// A pooled buffer being filled with framed members.
struct Frame {
    buf: Vec<u8>,
    len: usize,
}

impl Frame {
    fn put(&mut self, data: &[u8]) {
        self.buf[self.len..self.len + data.len()].copy_from_slice(data);
        self.len += data.len();
    }

    fn pad(&mut self, body: usize) {
        let pad = (512 - body % 512) % 512;
        self.buf[self.len..self.len + pad].fill(0);
        self.len += pad;
    }

    /// PAX member (if any) and the header.
    fn put_header(&mut self, h: &Header, records: &[u8]) {
        if !records.is_empty() {
            self.put(pax_header(records).as_bytes());
            self.put(records);
            self.pad(records.len());
        }
        self.put(h.as_bytes());
    }
}

/// Counts of what a run of members added.
#[derive(Default)]
struct Counts {
    entries: u64,
    files: u64,
    bytes: u64,
}

impl Counts {
    fn add_to(&self, result: &mut PackResult, progress: &PackProgress) {
        result.entries += self.entries;
        result.files += self.files;
        result.file_bytes += self.bytes;
        progress.entries.fetch_add(self.entries, Ordering::Relaxed);
        progress.files.fetch_add(self.files, Ordering::Relaxed);
        progress.bytes.fetch_add(self.bytes, Ordering::Relaxed);
    }
}

/// The header of any member of `p` (`records` gets its PAX records), and the body size.
fn member_header(p: &Plan<'_>, records: &mut Vec<u8>) -> io::Result<(Header, u64)> {
    let e = match &p.item {
        Item::Entry(e) => *e,
        Item::Whiteout(_) | Item::Opaque(_) => {
            return Ok((
                header_for(None, &p.name, EntryType::Regular, 0, None, records)?,
                0,
            ))
        }
    };
    if let Some(first) = &p.link_to {
        return Ok((
            header_for(Some(e), &p.name, EntryType::Link, 0, Some(first), records)?,
            0,
        ));
    }
    let (t, size, link) = match e.kind {
        Kind::File => (EntryType::Regular, e.size, None),
        Kind::Dir => (EntryType::Directory, 0, None),
        Kind::Symlink => (
            EntryType::Symlink,
            0,
            Some(e.link.as_deref().unwrap_or_default()),
        ),
        Kind::Fifo => (EntryType::Fifo, 0, None),
        Kind::Char => (EntryType::Char, 0, None),
        Kind::Block => (EntryType::Block, 0, None),
    };
    Ok((header_for(Some(e), &p.name, t, size, link, records)?, size))
}

fn count(p: &Plan<'_>, c: &mut Counts) {
    c.entries += 1;
    if let Item::Entry(e) = &p.item {
        if e.kind == Kind::File {
            // another name of a packed file counts as a file (as in the index), adds no bytes
            c.files += 1;
            if p.link_to.is_none() {
                c.bytes += e.size;
            }
        }
    }
}

fn member_path(root: &Path, p: &Plan<'_>) -> String {
    root.join(p.name.as_ref()).display().to_string()
}

/// Frame the members `plans` (all small) into `frame`, reading file bodies.
fn frame_batch(
    root: &Path,
    plans: &[Plan<'_>],
    frame: &mut Frame,
    dirs: &mut DirCache<'_>,
    records: &mut Vec<u8>,
) -> Result<Counts, PackError> {
    let mut c = Counts::default();
    for p in plans {
        let (h, size) =
            member_header(p, records).map_err(|e| PackError(member_path(root, p), e))?;
        frame.put_header(&h, records);
        if let Some(e) = p.reads() {
            let size = size as usize;
            let mut f =
                open_checked(dirs, e).map_err(|err| PackError(member_path(root, p), err))?;
            read_body(&mut f, &mut frame.buf[frame.len..], size)
                .map_err(|err| PackError(member_path(root, p), err))?;
            frame.len += size;
            frame.pad(size);
        }
        count(p, &mut c);
    }
    Ok(c)
}

/// Chunk size of the tar stream handed to the diff_id hasher and the compressor, and the
/// largest batch of small members.
const TAR_BUFFER: usize = 1 << 20;

/// The tar stream's sink: cuts it into `TAR_BUFFER` chunks shared with the diff_id hasher thread
/// and the compressor thread, so framing, hashing and compression run side by side.
struct ChunkSink {
    /// The chunk being filled (a pool buffer, `TAR_BUFFER` long) and how much of it is.
    buf: Vec<u8>,
    used: usize,
    pool: Pool,
    to_hash: Sender<Shared>,
    to_compress: Sender<Shared>,
}

impl ChunkSink {
    fn send_shared(&self, chunk: Shared) -> io::Result<()> {
        let gone = || io::Error::new(io::ErrorKind::BrokenPipe, "compressor stopped");
        self.to_hash.send(chunk.clone()).map_err(|_| gone())?;
        self.to_compress.send(chunk).map_err(|_| gone())
    }

    fn send(&mut self) -> io::Result<()> {
        if self.used == 0 {
            return Ok(());
        }
        let next = self.pool.take();
        let full = std::mem::replace(&mut self.buf, next);
        let chunk = self.pool.share(full, std::mem::take(&mut self.used));
        self.send_shared(chunk)
    }

    /// Pass a framed batch on as it is (after what is pending, to keep the order).
    fn send_batch(&mut self, frame: Frame) -> io::Result<()> {
        self.send()?;
        if frame.len == 0 {
            return Ok(());
        }
        let chunk = self.pool.share(frame.buf, frame.len);
        self.send_shared(chunk)
    }

    /// One `read` of `r` straight into the chunk being filled; 0 at the end of `r`.
    fn read_from<R: Read>(&mut self, r: &mut R) -> io::Result<usize> {
        let n = loop {
            match r.read(&mut self.buf[self.used..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        self.used += n;
        if self.used == self.buf.len() {
            self.send()?;
        }
        Ok(n)
    }
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.buf.len() - self.used);
        self.buf[self.used..self.used + n].copy_from_slice(&data[..n]);
        self.used += n;
        if self.used == self.buf.len() {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Chunks in flight between the tar writer and each of the hasher and compressor.
const PIPE_CHUNKS: usize = 8;

/// A run of plans: a batch of small members framed by a reader, or one member framed here.
enum Group {
    Batch(std::ops::Range<usize>),
    Single(usize),
}

fn groups(plans: &[Plan<'_>], batch_bytes: u64) -> Vec<Group> {
    let mut out = Vec::new();
    let mut start = 0usize;
    let mut acc = 0u64;
    for (i, p) in plans.iter().enumerate() {
        if p.framed > PRELOAD_MAX || p.framed + 1 > batch_bytes {
            if start < i {
                out.push(Group::Batch(start..i));
            }
            out.push(Group::Single(i));
            start = i + 1;
            acc = 0;
            continue;
        }
        // +1: room for the byte that tells a file grew
        if acc + p.framed + 1 > batch_bytes {
            out.push(Group::Batch(start..i));
            start = i;
            acc = 0;
        }
        acc += p.framed;
    }
    if start < plans.len() {
        out.push(Group::Batch(start..plans.len()));
    }
    out
}

/// Pack `entries` (sorted, as from `scan`; a subset for deltas) with `whiteouts` and `opaque`
/// directories, from the tree at `root`, into `out`. Returns the result and the sink.
///
/// Threads: `readers` batch framers, the tar writer (this thread), a diff_id hasher, a
/// compressor feeding `threads` zstd workers and hashing their output.
/// Memory: about (READ_WINDOW + 2 x PIPE_CHUNKS) x TAR_BUFFER + zstd's buffers.
pub fn pack<W: Write + Send>(
    root: &Path,
    entries: &[&Entry],
    whiteouts: &[String],
    opaque: &[String],
    out: W,
    opts: &PackOptions,
    progress: &PackProgress,
) -> Result<(PackResult, W), PackError> {
    pack_batched(
        root,
        entries,
        whiteouts,
        opaque,
        out,
        opts,
        progress,
        TAR_BUFFER as u64,
    )
}

#[allow(clippy::too_many_arguments)]
fn pack_batched<W: Write + Send>(
    root: &Path,
    entries: &[&Entry],
    whiteouts: &[String],
    opaque: &[String],
    out: W,
    opts: &PackOptions,
    progress: &PackProgress,
    batch_bytes: u64,
) -> Result<(PackResult, W), PackError> {
    let root_dir = Dir::open(root).map_err(ctx(root.display()))?;
    if let Some(e) = entries.iter().find(|e| e.path == ROOT) {
        let st = root_dir.stat().map_err(ctx(root.display()))?;
        if st.st_dev != e.dev || st.st_ino != e.ino {
            return Err(PackError(
                root.display().to_string(),
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "directory changed while packing (another inode than the scanned one)",
                ),
            ));
        }
    }
    let plans = plan(entries, whiteouts, opaque);
    let groups = groups(&plans, batch_bytes.min(TAR_BUFFER as u64));
    let enc = LayerEncoder::new(
        HashingWriter::new(out, opts.algorithm),
        opts.level,
        opts.threads.max(1),
    )
    .map_err(ctx("zstd"))?;
    let mut result = PackResult::default();

    let (diff, compressed) = std::thread::scope(|s| {
        let (hash_tx, hash_rx) = bounded::<Shared>(PIPE_CHUNKS);
        let (comp_tx, comp_rx) = bounded::<Shared>(PIPE_CHUNKS);
        let pool = Pool::new(TAR_BUFFER, 2 * PIPE_CHUNKS + READ_WINDOW + 4);
        let hasher = s.spawn(move || {
            let mut h = StreamHasher::new(Algorithm::Sha256);
            let mut n = 0u64;
            for chunk in hash_rx.iter() {
                h.update(&chunk);
                n += chunk.len() as u64;
            }
            (h.digest_string(), n)
        });
        let compressor = s.spawn(move || -> io::Result<HashingWriter<W>> {
            let mut enc = enc;
            for chunk in comp_rx.iter() {
                enc.write_all(&chunk)?;
            }
            enc.finish()
        });
        let mut sink = ChunkSink {
            buf: pool.take(),
            used: 0,
            pool: pool.clone(),
            to_hash: hash_tx,
            to_compress: comp_tx,
        };
        let written = write_groups(
            s,
            root,
            &root_dir,
            &plans,
            &groups,
            opts,
            &pool,
            &mut sink,
            &mut result,
            progress,
        )
        .and_then(|()| {
            // the end of the archive: two zero blocks
            sink.write_all(&[0u8; 1024]).map_err(ctx("tar"))?;
            sink.flush().map_err(ctx("tar"))
        });
        drop(sink); // ends both threads' loops
        let diff = hasher.join();
        let compressed = compressor.join();
        let compressed = match compressed {
            Ok(Ok(w)) => Ok(w),
            Ok(Err(e)) => Err(PackError("zstd".into(), e)),
            Err(_) => Err(PackError(
                "zstd".into(),
                io::Error::other("compressor panicked"),
            )),
        };
        // a packing error explains a stopped compressor only if the compressor itself failed
        // first; an output error explains a broken pipe on the writer side: report it first
        let compressed = compressed?;
        written?;
        let diff =
            diff.map_err(|_| PackError("sha256".into(), io::Error::other("hasher panicked")))?;
        Ok::<_, PackError>((diff, compressed))
    })?;

    let HashingWriter {
        mut inner,
        hasher,
        count,
    } = compressed;
    inner.flush().map_err(ctx("output"))?;
    result.digest = hasher.digest_string();
    result.diff_id = diff.0;
    result.size = count;
    result.uncompressed_size = diff.1;
    Ok((result, inner))
}

type Framed = Result<(Frame, Counts), PackError>;

enum Slot {
    Batch(Receiver<Framed>),
    Single(usize),
}

#[allow(clippy::too_many_arguments)]
fn write_groups<'scope, 'env>(
    s: &'scope std::thread::Scope<'scope, 'env>,
    root: &'env Path,
    root_dir: &'env Dir,
    plans: &'env [Plan<'env>],
    groups: &'env [Group],
    opts: &PackOptions,
    pool: &Pool,
    sink: &mut ChunkSink,
    result: &mut PackResult,
    progress: &PackProgress,
) -> Result<(), PackError> {
    type Job = (std::ops::Range<usize>, Sender<Framed>);
    let (job_tx, job_rx) = bounded::<Job>(READ_WINDOW);
    let (slot_tx, slot_rx) = bounded::<Slot>(READ_WINDOW);
    for _ in 0..opts.readers.max(1) {
        let job_rx = job_rx.clone();
        let pool = pool.clone();
        s.spawn(move || {
            let mut dirs = DirCache::new(root_dir);
            let mut records = Vec::new();
            for (range, reply) in job_rx.iter() {
                let mut frame = Frame {
                    buf: pool.take(),
                    len: 0,
                };
                let r = frame_batch(root, &plans[range], &mut frame, &mut dirs, &mut records)
                    .map(|c| (frame, c));
                let _ = reply.send(r);
            }
        });
    }
    drop(job_rx);
    s.spawn(move || {
        for g in groups {
            let slot = match g {
                Group::Batch(range) => {
                    let (tx, rx) = bounded(1);
                    if job_tx.send((range.clone(), tx)).is_err() {
                        return;
                    }
                    Slot::Batch(rx)
                }
                Group::Single(i) => Slot::Single(*i),
            };
            if slot_tx.send(slot).is_err() {
                return; // the writer stopped (error): stop reading ahead
            }
        }
    });
    // Consumes slots in plan order; returning drops `slot_rx`, which stops the read-ahead.
    let mut dirs = DirCache::new(root_dir);
    let mut records = Vec::new();
    for _ in groups {
        let slot = slot_rx
            .recv()
            .map_err(|_| PackError("reader".into(), io::Error::other("reader thread ended")))?;
        match slot {
            Slot::Batch(rx) => {
                let (frame, c) = rx.recv().map_err(|_| {
                    PackError("reader".into(), io::Error::other("reader thread ended"))
                })??;
                sink.send_batch(frame).map_err(ctx("tar"))?;
                c.add_to(result, progress);
            }
            Slot::Single(i) => {
                let p = &plans[i];
                let c = write_single(root, p, &mut dirs, &mut records, sink)?;
                c.add_to(result, progress);
            }
        }
    }
    Ok(())
}

/// Frame one (large) member through the sink, streaming a file body from disk.
fn write_single(
    root: &Path,
    p: &Plan<'_>,
    dirs: &mut DirCache<'_>,
    records: &mut Vec<u8>,
    sink: &mut ChunkSink,
) -> Result<Counts, PackError> {
    let what = || member_path(root, p);
    let (h, size) = member_header(p, records).map_err(|e| PackError(what(), e))?;
    // open (and check) before writing anything of the member
    let file = match p.reads() {
        Some(e) => Some(open_checked(dirs, e).map_err(|err| PackError(what(), err))?),
        None => None,
    };
    let io_ctx = |e: io::Error| PackError(what(), e);
    if !records.is_empty() {
        sink.write_all(pax_header(records).as_bytes())
            .map_err(io_ctx)?;
        sink.write_all(records).map_err(io_ctx)?;
        let pad = (512 - records.len() % 512) % 512;
        sink.write_all(&[0u8; 512][..pad]).map_err(io_ctx)?;
    }
    sink.write_all(h.as_bytes()).map_err(io_ctx)?;
    if let Some(file) = file {
        let mut reader = ExactFile {
            file,
            left: size,
            size,
        };
        let mut len = 0u64;
        loop {
            match sink.read_from(&mut reader).map_err(io_ctx)? {
                0 => break,
                n => len += n as u64,
            }
        }
        let pad = ((512 - (len % 512)) % 512) as usize;
        sink.write_all(&[0u8; 512][..pad]).map_err(io_ctx)?;
    }
    let mut c = Counts::default();
    count(p, &mut c);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::super::index::scan;
    use super::*;
    use std::fs;

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        let r = t.path();
        fs::create_dir_all(r.join("src/deep/er")).expect("mkdir");
        fs::create_dir(r.join("empty")).expect("mkdir");
        for i in 0..50 {
            fs::write(
                r.join(format!("src/f{i}.txt")),
                format!("file {i}\n").repeat(i * 10),
            )
            .expect("write");
        }
        let big: Vec<u8> = (0..(3 * PRELOAD_MAX as usize))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        fs::write(r.join("big.bin"), &big).expect("write");
        let long = "n".repeat(150);
        fs::write(r.join(format!("src/deep/er/{long}")), b"long").expect("write");
        std::os::unix::fs::symlink("../big.bin", r.join("src/rel")).expect("symlink");
        fs::hard_link(r.join("big.bin"), r.join("src/big-link")).expect("link");
        t
    }

    fn pack_all(root: &Path, threads: u32) -> (PackResult, Vec<u8>) {
        let entries = scan(root, None).expect("scan");
        let refs: Vec<&Entry> = entries.iter().collect();
        let opts = PackOptions {
            threads,
            ..PackOptions::default()
        };
        pack(
            root,
            &refs,
            &[],
            &[],
            Vec::new(),
            &opts,
            &PackProgress::default(),
        )
        .expect("pack")
    }

    #[test]
    fn deterministic_and_hashes_match() {
        let t = tree();
        let (a, bytes) = pack_all(t.path(), 1);
        let (b, _) = pack_all(t.path(), 3);
        assert_eq!(a, b, "same tree, any thread count: same layer");
        let mut h = StreamHasher::new(Algorithm::Sha256);
        h.update(&bytes);
        assert_eq!(a.digest, h.digest_string());
        assert_eq!(a.size, bytes.len() as u64);
        let tar_bytes = zstd::stream::decode_all(bytes.as_slice()).expect("decode");
        let mut h = StreamHasher::new(Algorithm::Sha256);
        h.update(&tar_bytes);
        assert_eq!(a.diff_id, h.digest_string());
        assert_eq!(a.uncompressed_size, tar_bytes.len() as u64);
        // the tar reads back with the expected members, the hardlink as a link
        let mut ar = tar::Archive::new(tar_bytes.as_slice());
        let mut names = Vec::new();
        for ent in ar.entries().expect("entries") {
            let ent = ent.expect("entry");
            names.push((
                String::from_utf8_lossy(&ent.path_bytes()).into_owned(),
                ent.header().entry_type(),
            ));
        }
        assert_eq!(names[0], ("./".to_owned(), EntryType::Directory));
        assert!(names.contains(&("src/big-link".to_owned(), EntryType::Link)));
        assert!(names.iter().any(|(n, _)| n.ends_with(&"n".repeat(150))));
    }

    #[test]
    fn shrinking_file_is_an_error() {
        let t = tree();
        let entries = scan(t.path(), None).expect("scan");
        fs::write(t.path().join("big.bin"), b"short now").expect("write");
        let refs: Vec<&Entry> = entries.iter().collect();
        let err = pack(
            t.path(),
            &refs,
            &[],
            &[],
            io::sink(),
            &PackOptions::default(),
            &PackProgress::default(),
        )
        .expect_err("must fail");
        assert!(err.to_string().contains("changed while packing"), "{err}");
    }

    #[test]
    fn batching_does_not_change_the_layer() {
        let t = tree();
        let entries = scan(t.path(), None).expect("scan");
        let refs: Vec<&Entry> = entries.iter().collect();
        let run = |batch: u64, readers: usize| {
            let opts = PackOptions {
                readers,
                ..PackOptions::default()
            };
            pack_batched(
                t.path(),
                &refs,
                &[],
                &[],
                Vec::new(),
                &opts,
                &PackProgress::default(),
                batch,
            )
            .expect("pack")
        };
        let (a, bytes_a) = run(TAR_BUFFER as u64, 4);
        let (b, bytes_b) = run(4096, 1);
        let (c, _) = run(600, 3);
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(bytes_a, bytes_b);
    }

    #[test]
    fn pax_records_match_the_tar_crate() {
        // the records we format by hand are byte for byte what tar's builder writes
        let mut ours = Vec::new();
        pax_record(&mut ours, "mtime", b"1234567890.000000005");
        pax_record(&mut ours, "path", "é".repeat(60).as_bytes());
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([
            ("mtime", b"1234567890.000000005".as_slice()),
            ("path", "é".repeat(60).as_bytes()),
        ])
        .expect("pax");
        let theirs = b.into_inner().expect("tar");
        assert_eq!(&theirs[..512], pax_header(&ours).as_bytes());
        assert_eq!(&theirs[512..512 + ours.len()], ours.as_slice());
        let mut t = [0u8; 32];
        let n = fmt_pax_time(&mut t, -1_500_000_000);
        assert_eq!(&t[..n], b"-1.500000000");
    }

    #[test]
    fn file_swapped_for_a_symlink_after_the_scan_is_never_read() {
        let outside = tempfile::tempdir().expect("tempdir");
        let secret = outside.path().join("secret");
        fs::write(&secret, b"TOP-SECRET-BYTES").expect("write");
        let t = tempfile::tempdir().expect("tempdir");
        fs::write(t.path().join("x"), b"harmless-bytes!!").expect("write");
        fs::create_dir(t.path().join("d")).expect("mkdir");
        fs::write(t.path().join("d/y"), b"harmless-bytes!!").expect("write");
        let entries = scan(t.path(), None).expect("scan");
        // same size, now a symlink to a file outside; and a directory swapped for a symlink
        fs::remove_file(t.path().join("x")).expect("rm");
        std::os::unix::fs::symlink(&secret, t.path().join("x")).expect("symlink");
        let refs: Vec<&Entry> = entries.iter().filter(|e| e.path != "d/y").collect();
        let err = pack(
            t.path(),
            &refs,
            &[],
            &[],
            Vec::new(),
            &PackOptions::default(),
            &PackProgress::default(),
        )
        .expect_err("must refuse");
        assert!(err.to_string().contains("changed while packing"), "{err}");
        fs::remove_file(t.path().join("x")).expect("rm");
        fs::write(t.path().join("x"), b"harmless-bytes!!").expect("write");
        fs::rename(t.path().join("d"), t.path().join("d-moved")).expect("mv");
        std::os::unix::fs::symlink(outside.path(), t.path().join("d")).expect("symlink");
        fs::write(outside.path().join("y"), b"TOP-SECRET-BYTES").expect("write");
        let only_y: Vec<&Entry> = entries.iter().filter(|e| e.path == "d/y").collect();
        let err = pack(
            t.path(),
            &only_y,
            &[],
            &[],
            Vec::new(),
            &PackOptions::default(),
            &PackProgress::default(),
        )
        .expect_err("must refuse");
        assert!(err.to_string().contains("changed while packing"), "{err}");
    }

    #[test]
    fn whiteout_names() {
        assert_eq!(Item::Whiteout("a/b".into()).tar_path(), "a/.wh.b");
        assert_eq!(Item::Whiteout("top".into()).tar_path(), ".wh.top");
        assert_eq!(Item::Opaque("d".into()).tar_path(), "d/.wh..wh..opq");
    }
}
