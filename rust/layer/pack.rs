//! Pack a scanned tree (or the changed part of it, plus whiteouts) into a tar+zstd layer in one
//! pass, hashing the compressed stream (blob digest) and the tar stream (diff_id) as they are
//! written.
//!
//! Pipeline: reader threads load small files ahead of the writer, in order, through a bounded
//! window (memory <= `READ_WINDOW` x `PRELOAD_MAX`); large files stream straight from disk. The
//! writer frames tar entries (ustar + PAX for nanosecond mtimes, long names, big ids/sizes),
//! hashes them for the diff_id and feeds multithreaded zstd, whose output is hashed for the
//! digest and written to the sink. Entries are in index order, headers carry only what `scan`
//! recorded (no atime, no user names), so the same tree gives the same bytes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::{bounded, Receiver, Sender};
use tar::{EntryType, Header};

use super::chunks::{Pool, Shared};
use super::encoder::LayerEncoder;
use super::index::{Entry, Kind, ROOT};
use crate::digest::{Algorithm, StreamHasher};

/// Files up to this size are read ahead by the reader threads; larger ones stream.
pub const PRELOAD_MAX: u64 = 512 * 1024;
/// How many entries the readers may run ahead of the writer.
pub const READ_WINDOW: usize = 128;
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
            readers: (cpus * 2).clamp(2, 8),
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

impl Item<'_> {
    fn tar_path(&self) -> String {
        match self {
            Item::Entry(e) => e.path.clone(),
            Item::Whiteout(p) => match p.rfind('/') {
                Some(i) => format!("{}/{WHITEOUT_PREFIX}{}", &p[..i], &p[i + 1..]),
                None => format!("{WHITEOUT_PREFIX}{p}"),
            },
            Item::Opaque(d) if d == ROOT => OPAQUE.to_owned(),
            Item::Opaque(d) => format!("{d}/{OPAQUE}"),
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
    name: String,
    /// For the second and later names of a hardlinked file: the first name in this layer.
    link_to: Option<String>,
    preload: bool,
}

fn plan<'a>(entries: &[&'a Entry], whiteouts: &[String], opaque: &[String]) -> Vec<Plan<'a>> {
    let mut items: Vec<Item<'a>> = entries.iter().map(|e| Item::Entry(e)).collect();
    items.extend(whiteouts.iter().map(|p| Item::Whiteout(p.clone())));
    items.extend(opaque.iter().map(|d| Item::Opaque(d.clone())));
    let mut named: Vec<(String, Item<'a>)> = items.into_iter().map(|i| (i.tar_path(), i)).collect();
    // Opaque markers right after their directory and before its children (key `dir/\0`: names
    // never contain NUL), so that simple unpackers apply them before the new content; everything
    // else in path order.
    named.sort_by_cached_key(|(name, item)| match item {
        Item::Opaque(d) if d == ROOT => vec![0u8],
        Item::Opaque(d) => [d.as_bytes(), b"/\0"].concat(),
        _ => sort_key(name).to_vec(),
    });
    let mut first_name: HashMap<(u64, u64), String> = HashMap::new();
    named
        .into_iter()
        .map(|(name, item)| {
            let mut link_to = None;
            let mut preload = false;
            if let Item::Entry(e) = &item {
                if e.is_hardlinked() {
                    match first_name.get(&(e.dev, e.ino)) {
                        Some(first) => link_to = Some(first.clone()),
                        None => {
                            first_name.insert((e.dev, e.ino), name.clone());
                        }
                    }
                }
                preload = e.kind == Kind::File && link_to.is_none() && e.size <= PRELOAD_MAX;
            }
            Plan {
                item,
                name,
                link_to,
                preload,
            }
        })
        .collect()
}

fn read_exact_file(path: &Path, size: u64) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let mut buf = Vec::with_capacity(size as usize);
    (&mut f).take(size + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 != size {
        return Err(changed(size, buf.len() as u64));
    }
    Ok(buf)
}

fn changed(expected: u64, got: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("file changed while packing (scanned {expected} bytes, read {got})"),
    )
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

/// PAX extended-header records of one member, sorted by key.
type PaxRecords = Vec<(&'static str, Vec<u8>)>;

const USTAR_MAX_OCTAL: u64 = 0o77777777777;
const USTAR_MAX_ID: u64 = 0o7777777;

fn pax_time(ns: i64) -> String {
    let sign = if ns < 0 { "-" } else { "" };
    let abs = ns.unsigned_abs();
    format!("{sign}{}.{:09}", abs / 1_000_000_000, abs % 1_000_000_000)
}

fn set_name_raw(field: &mut [u8], value: &[u8]) {
    // The PAX record carries the real name; the header keeps a prefix (cut on a UTF-8 boundary).
    let mut n = value.len().min(field.len());
    while n > 0 && std::str::from_utf8(&value[..n]).is_err() {
        n -= 1;
    }
    field.fill(0);
    field[..n].copy_from_slice(&value[..n]);
}

fn header_for(
    e: Option<&Entry>,
    name: &str,
    kind: EntryType,
    size: u64,
    link: Option<&str>,
) -> io::Result<(Header, PaxRecords)> {
    let mut h = Header::new_ustar();
    let mut pax: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let tar_name = if kind == EntryType::Directory {
        if name == ROOT {
            "./".to_owned()
        } else {
            format!("{name}/")
        }
    } else {
        name.to_owned()
    };
    if tar_name.len() > 100 || !tar_name.is_ascii() {
        pax.push(("path", tar_name.as_bytes().to_vec()));
    }
    if let Some(u) = h.as_ustar_mut() {
        set_name_raw(&mut u.name, tar_name.as_bytes());
    }
    if let Some(target) = link {
        if target.len() > 100 || !target.is_ascii() {
            pax.push(("linkpath", target.as_bytes().to_vec()));
        }
        if let Some(u) = h.as_ustar_mut() {
            set_name_raw(&mut u.linkname, target.as_bytes());
        }
    }
    h.set_entry_type(kind);
    if size > USTAR_MAX_OCTAL {
        pax.push(("size", size.to_string().into_bytes()));
    }
    h.set_size(size);
    match e {
        Some(e) => {
            h.set_mode(e.mode);
            for (key, id) in [("uid", e.uid), ("gid", e.gid)] {
                if u64::from(id) > USTAR_MAX_ID {
                    pax.push((key, id.to_string().into_bytes()));
                }
            }
            h.set_uid(u64::from(e.uid).min(USTAR_MAX_ID));
            h.set_gid(u64::from(e.gid).min(USTAR_MAX_ID));
            let secs = e.mtime_ns.div_euclid(1_000_000_000);
            if e.mtime_ns.rem_euclid(1_000_000_000) != 0
                || secs < 0
                || secs as u64 > USTAR_MAX_OCTAL
            {
                pax.push(("mtime", pax_time(e.mtime_ns).into_bytes()));
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
    pax.sort_by(|a, b| a.0.cmp(b.0));
    h.set_cksum();
    Ok((h, pax))
}

fn append<R: Read>(
    b: &mut tar::Builder<ChunkSink>,
    header: &Header,
    pax: &[(&'static str, Vec<u8>)],
    mut data: R,
) -> io::Result<()> {
    if !pax.is_empty() {
        b.append_pax_extensions(pax.iter().map(|(k, v)| (*k, v.as_slice())))?;
    }
    // tar's own append copies through `dyn Write` in 8 KiB steps; bodies are read straight into
    // the chunks the hasher and the compressor take (no intermediate copy).
    let out = b.get_mut();
    out.write_all(header.as_bytes())?;
    let mut len = 0u64;
    loop {
        match out.read_from(&mut data)? {
            0 => break,
            n => len += n as u64,
        }
    }
    let pad = (512 - (len % 512) as usize) % 512;
    out.write_all(&[0u8; 512][..pad])
}

/// Chunk size of the tar stream handed to the diff_id hasher and the compressor.
const TAR_BUFFER: usize = 1 << 20;

/// Append a body already in memory.
fn append_bytes(
    b: &mut tar::Builder<ChunkSink>,
    header: &Header,
    pax: &[(&'static str, Vec<u8>)],
    data: &[u8],
) -> io::Result<()> {
    if !pax.is_empty() {
        b.append_pax_extensions(pax.iter().map(|(k, v)| (*k, v.as_slice())))?;
    }
    let out = b.get_mut();
    out.write_all(header.as_bytes())?;
    out.write_all(data)?;
    let pad = (512 - (data.len() % 512)) % 512;
    out.write_all(&[0u8; 512][..pad])
}

type Loaded = io::Result<Vec<u8>>;

enum Slot {
    Ready(Receiver<Loaded>),
    Inline,
}

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
    fn send(&mut self) -> io::Result<()> {
        if self.used == 0 {
            return Ok(());
        }
        let next = self.pool.take();
        let full = std::mem::replace(&mut self.buf, next);
        let chunk = self.pool.share(full, std::mem::take(&mut self.used));
        let gone = || io::Error::new(io::ErrorKind::BrokenPipe, "compressor stopped");
        self.to_hash.send(chunk.clone()).map_err(|_| gone())?;
        self.to_compress.send(chunk).map_err(|_| gone())
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

/// Pack `entries` (sorted, as from `scan`; a subset for deltas) with `whiteouts` and `opaque`
/// directories, from the tree at `root`, into `out`. Returns the result and the sink.
///
/// Threads: `readers` file readers (read-ahead of small files), the tar writer (this thread),
/// a diff_id hasher, a compressor feeding `threads` zstd workers and hashing their output.
/// Memory: READ_WINDOW x PRELOAD_MAX + 2 x PIPE_CHUNKS x TAR_BUFFER + zstd's buffers.
pub fn pack<W: Write + Send>(
    root: &Path,
    entries: &[&Entry],
    whiteouts: &[String],
    opaque: &[String],
    out: W,
    opts: &PackOptions,
    progress: &PackProgress,
) -> Result<(PackResult, W), PackError> {
    let plans = plan(entries, whiteouts, opaque);
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
        let pool = Pool::new(TAR_BUFFER, 2 * PIPE_CHUNKS + 2);
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
        let sink = ChunkSink {
            buf: pool.take(),
            used: 0,
            pool,
            to_hash: hash_tx,
            to_compress: comp_tx,
        };
        let mut builder = tar::Builder::new(sink);
        let written = write_all_entries(s, root, &plans, opts, &mut builder, &mut result, progress)
            .and_then(|()| {
                let mut sink = builder.into_inner().map_err(ctx("tar"))?;
                sink.flush().map_err(ctx("tar"))
            });
        // (the builder and its senders are dropped here, ending both threads' loops)
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
        // an output error explains a broken pipe on the writer side: report it first
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

fn write_all_entries<'scope, 'env>(
    s: &'scope std::thread::Scope<'scope, 'env>,
    root: &'env Path,
    plans: &'env [Plan<'env>],
    opts: &PackOptions,
    builder: &mut tar::Builder<ChunkSink>,
    result: &mut PackResult,
    progress: &PackProgress,
) -> Result<(), PackError> {
    let (job_tx, job_rx) = bounded::<(PathBuf, u64, Sender<Loaded>)>(READ_WINDOW);
    let (slot_tx, slot_rx) = bounded::<Slot>(READ_WINDOW);
    for _ in 0..opts.readers.max(1) {
        let job_rx = job_rx.clone();
        s.spawn(move || {
            for (path, size, reply) in job_rx.iter() {
                let _ = reply.send(read_exact_file(&path, size));
            }
        });
    }
    drop(job_rx);
    s.spawn(move || {
        for p in plans {
            let slot = match (&p.item, p.preload) {
                (Item::Entry(e), true) => {
                    let (tx, rx) = bounded(1);
                    if job_tx.send((root.join(&e.path), e.size, tx)).is_err() {
                        return;
                    }
                    Slot::Ready(rx)
                }
                _ => Slot::Inline,
            };
            if slot_tx.send(slot).is_err() {
                return; // the writer stopped (error): stop reading ahead
            }
        }
    });
    // Consumes slots in plan order; returning drops `slot_rx`, which stops the read-ahead.
    for p in plans {
        let slot = slot_rx
            .recv()
            .map_err(|_| PackError("reader".into(), io::Error::other("reader thread ended")))?;
        write_one(root, p, slot, builder, result, progress)?;
    }
    Ok(())
}

fn write_one(
    root: &Path,
    p: &Plan<'_>,
    slot: Slot,
    b: &mut tar::Builder<ChunkSink>,
    result: &mut PackResult,
    progress: &PackProgress,
) -> Result<(), PackError> {
    let e = match &p.item {
        Item::Entry(e) => *e,
        Item::Whiteout(_) | Item::Opaque(_) => {
            let (h, pax) =
                header_for(None, &p.name, EntryType::Regular, 0, None).map_err(ctx(&p.name))?;
            append(b, &h, &pax, io::empty()).map_err(ctx(&p.name))?;
            result.entries += 1;
            return Ok(());
        }
    };
    let full = root.join(&e.path);
    let what = || full.display().to_string();
    if let Some(first) = &p.link_to {
        let (h, pax) =
            header_for(Some(e), &p.name, EntryType::Link, 0, Some(first)).map_err(ctx(what()))?;
        append(b, &h, &pax, io::empty()).map_err(ctx(what()))?;
        // another name of a packed file: counts as a file (as in the index), adds no bytes
        result.files += 1;
        progress.files.fetch_add(1, Ordering::Relaxed);
    } else {
        match e.kind {
            Kind::File => {
                let (h, pax) = header_for(Some(e), &p.name, EntryType::Regular, e.size, None)
                    .map_err(ctx(what()))?;
                match slot {
                    Slot::Ready(rx) => {
                        let data = rx
                            .recv()
                            .map_err(|_| {
                                PackError(what(), io::Error::other("reader thread ended"))
                            })?
                            .map_err(ctx(what()))?;
                        append_bytes(b, &h, &pax, &data).map_err(ctx(what()))?;
                    }
                    Slot::Inline => {
                        let file = File::open(&full).map_err(ctx(what()))?;
                        let reader = ExactFile {
                            file,
                            left: e.size,
                            size: e.size,
                        };
                        append(b, &h, &pax, reader).map_err(ctx(what()))?;
                    }
                }
                result.files += 1;
                result.file_bytes += e.size;
                progress.files.fetch_add(1, Ordering::Relaxed);
                progress.bytes.fetch_add(e.size, Ordering::Relaxed);
            }
            Kind::Dir => {
                let (h, pax) = header_for(Some(e), &p.name, EntryType::Directory, 0, None)
                    .map_err(ctx(what()))?;
                append(b, &h, &pax, io::empty()).map_err(ctx(what()))?;
            }
            Kind::Symlink => {
                let target = e.link.as_deref().unwrap_or_default();
                let (h, pax) = header_for(Some(e), &p.name, EntryType::Symlink, 0, Some(target))
                    .map_err(ctx(what()))?;
                append(b, &h, &pax, io::empty()).map_err(ctx(what()))?;
            }
            Kind::Fifo | Kind::Char | Kind::Block => {
                let t = match e.kind {
                    Kind::Fifo => EntryType::Fifo,
                    Kind::Char => EntryType::Char,
                    _ => EntryType::Block,
                };
                let (h, pax) = header_for(Some(e), &p.name, t, 0, None).map_err(ctx(what()))?;
                append(b, &h, &pax, io::empty()).map_err(ctx(what()))?;
            }
        }
    }
    result.entries += 1;
    progress.entries.fetch_add(1, Ordering::Relaxed);
    Ok(())
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
    fn whiteout_names() {
        assert_eq!(Item::Whiteout("a/b".into()).tar_path(), "a/.wh.b");
        assert_eq!(Item::Whiteout("top".into()).tar_path(), ".wh.top");
        assert_eq!(Item::Opaque("d".into()).tar_path(), "d/.wh..wh..opq");
    }
}
