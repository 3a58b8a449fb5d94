//! Apply tar+zstd layers, in order, to a target directory: OCI whiteouts, type changes, and
//! parallel file writes, refusing anything that would touch the world outside the target.
//!
//! The tar thread walks the stream sequentially and does everything that depends on order or
//! on the namespace (path checks, removals, mkdir, symlinks, hard links). Small files go to a
//! pool of writer threads (the files of one directory to one writer) that write the bytes and
//! set mode, owner and times through the descriptor. In the first layer applied to an empty
//! target (a restore), a writer also creates the file (`O_CREAT|O_EXCL|O_NOFOLLOW` under its
//! parent's handle): creating inodes is most of the cost of many small files, and writers in
//! different directories do it in parallel. A name the stream already used, a hard link and a
//! whiteout first wait for the writers, so the tree is the stream applied in order. Elsewhere
//! the tar thread creates each file and hands over the open descriptor. Directory modes and
//! times are set at `finish`, deepest first, after every layer, through
//! `O_NOFOLLOW|O_DIRECTORY` descriptors.
//!
//! Nothing is reached by path: the target is a directory handle (see `SafeRoot`), every
//! directory below it is opened relative to its parent's handle without following symlinks,
//! and each entry is created, replaced or removed by its last name relative to its parent's
//! handle. A racer that renames a symlink over the target (or anything in it) cannot redirect
//! a single write.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use cap_fs_ext::{FollowSymlinks, OpenOptionsFollowExt};
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};
use crossbeam_channel::{bounded, unbounded, Sender};
use rustix::fs::Mode;
use rustix::fs::{AtFlags, Gid, OFlags, Timespec, Timestamps, Uid};
use rustix::io::Errno;
use tar::EntryType;

use super::chunks::{Pool, Shared};
use super::pack::{OPAQUE, WHITEOUT_PREFIX};
use super::safety::{
    clean_path, io_ctx, unsafe_err, Budget, CountingReader, LimitedReader, Limits, SafeRoot,
    UnpackError,
};
use crate::digest::{validate_digest, StreamHasher};

/// File bodies up to this size are handed to the writer pool; larger ones are written inline.
pub const POOL_MAX: u64 = 1 << 20;
/// Jobs in flight in the writer pool, at most (enough for several directories at once).
pub const POOL_QUEUE_JOBS: usize = 4096;
/// Body bytes in flight in the writer pool, at most (bounds its memory).
pub const POOL_QUEUE_BYTES: u64 = 64 << 20;

#[derive(Clone, Copy, Debug, Default)]
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime_ns: i64,
}

impl Meta {
    fn times(&self) -> Timestamps {
        let t = Timespec {
            tv_sec: self.mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: self.mtime_ns.rem_euclid(1_000_000_000) as _,
        };
        Timestamps {
            last_access: t,
            last_modification: t,
        }
    }

    fn owner(&self) -> (Option<Uid>, Option<Gid>) {
        (
            Some(Uid::from_raw(self.uid as u32)),
            Some(Gid::from_raw(self.gid as u32)),
        )
    }
}

/// What the caller knows about a layer (from its descriptor), all verified.
#[derive(Clone, Debug, Default)]
pub struct LayerSpec {
    /// Digest of the compressed blob.
    pub digest: Option<String>,
    /// sha256 of the uncompressed tar. Hashed (a second sha256 pass, over the larger,
    /// uncompressed side) only when given: a verified `digest` already pins every byte.
    pub diff_id: Option<String>,
    /// Uncompressed tar size: the layer may not decompress to more.
    pub uncompressed_size: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerStats {
    pub digest: Option<String>,
    /// Computed only when the spec names one to verify.
    pub diff_id: Option<String>,
    pub compressed: u64,
    pub uncompressed: u64,
    pub entries: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnpackStats {
    pub layers: u64,
    pub entries: u64,
    pub files: u64,
    pub file_bytes: u64,
    pub bytes: u64,
}

/// Where a job's bytes go: a file the tar thread created, or a fresh name the worker creates
/// (`O_CREAT|O_EXCL|O_NOFOLLOW`, relative to its parent's handle).
enum Target {
    Open(File),
    Create(Arc<Dir>, String),
}

struct Job {
    target: Target,
    data: Vec<u8>,
    meta: Meta,
    path: String,
}

impl Job {
    fn run(self, same_owner: bool, umask: Option<u32>) -> Result<(), UnpackError> {
        let Job {
            target,
            data,
            meta,
            path,
        } = self;
        let mut chmod = true;
        let file = match target {
            Target::Open(f) => f,
            Target::Create(dir, name) => {
                let flags = OFlags::WRONLY
                    | OFlags::CREATE
                    | OFlags::EXCL
                    | OFlags::NOFOLLOW
                    | OFlags::CLOEXEC;
                // Created with its final mode when the umask leaves it whole and it has no
                // set-id or sticky bit: one fchmod less per file (the restore directory is
                // private until renamed into place, so the mode while writing exposes nothing).
                let create_mode = match umask {
                    Some(u) if meta.mode & 0o7000 == 0 && meta.mode & u & 0o777 == 0 => {
                        chmod = false;
                        meta.mode & 0o777
                    }
                    _ => 0o600,
                };
                let mode = Mode::from_raw_mode(create_mode as _);
                match rustix::fs::openat(&*dir, name.as_str(), flags, mode) {
                    Ok(fd) => File::from(fd),
                    Err(e) => return Err(UnpackError::Io(path, e.into())),
                }
            }
        };
        (&file)
            .write_all(&data)
            .and_then(|_| set_meta_after_write(&file, &meta, same_owner, chmod))
            .map_err(|e| UnpackError::Io(path, e))
    }
}

/// The process umask, read without changing it (`umask(2)` can only set it, which would race
/// with other threads creating files): `None` where /proc does not say. Read once per unpacker:
/// a umask changed while a restore runs applies to the files it creates after that as it would
/// to tar's, but a mode it strips is then not put back.
fn process_umask() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Umask:"))?;
    u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
}

type SharedError = Arc<Mutex<Option<UnpackError>>>;

fn record(slot: &SharedError, e: UnpackError) {
    if let Ok(mut g) = slot.lock() {
        g.get_or_insert(e);
    }
}

fn take(slot: &SharedError) -> Option<UnpackError> {
    slot.lock().ok().and_then(|mut g| g.take())
}

/// Owner (first: chown clears set-id bits), mode and times, through an open descriptor.
fn set_file_meta<F: AsFd>(file: F, meta: &Meta, same_owner: bool) -> io::Result<()> {
    set_meta_after_write(file, meta, same_owner, true)
}

/// As `set_file_meta`, the mode only with `chmod` (false: the file was created with it).
fn set_meta_after_write<F: AsFd>(
    file: F,
    meta: &Meta,
    same_owner: bool,
    chmod: bool,
) -> io::Result<()> {
    let fd = file.as_fd();
    if same_owner {
        let (u, g) = meta.owner();
        rustix::fs::fchown(fd, u, g)?;
    }
    if chmod {
        rustix::fs::fchmod(fd, rustix::fs::Mode::from_raw_mode(meta.mode as _))?;
    }
    rustix::fs::futimens(fd, &meta.times())?;
    Ok(())
}

/// Jobs and body bytes handed to the pool and not finished yet.
#[derive(Default)]
struct InFlight {
    state: Mutex<Counts>,
    changed: Condvar,
}

#[derive(Default)]
struct Counts {
    jobs: usize,
    bytes: u64,
    /// threads waiting on `changed`: a finished job wakes nobody when none waits (one futex
    /// call per file otherwise)
    waiting: usize,
}

impl Counts {
    /// A job of `bytes` fits in the pool's bounds (always, when nothing is in flight).
    fn fits(&self, bytes: u64) -> bool {
        self.jobs == 0 || (self.jobs < POOL_QUEUE_JOBS && self.bytes + bytes <= POOL_QUEUE_BYTES)
    }
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count a job of `bytes` if it fits in the bounds (always, when nothing is in flight).
    fn try_acquire(&self, bytes: u64) -> bool {
        let mut g = self.lock();
        let fits = g.fits(bytes);
        if fits {
            g.jobs += 1;
            g.bytes += bytes;
        }
        fits
    }

    /// Wait until a job of `bytes` fits in the bounds, then count it.
    fn acquire(&self, bytes: u64) {
        let mut g = self.lock();
        while !g.fits(bytes) {
            g.waiting += 1;
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
            g.waiting -= 1;
        }
        g.jobs += 1;
        g.bytes += bytes;
    }

    fn release(&self, bytes: u64) {
        self.release_many(1, bytes)
    }

    fn release_many(&self, jobs: usize, bytes: u64) {
        let mut g = self.lock();
        g.jobs -= jobs;
        g.bytes -= bytes;
        // Wake a waiter when the pool has drained to half its bounds (or empty, for `drain`):
        // the producer then queues a run of jobs instead of one per wake-up.
        if g.waiting > 0
            && (g.jobs == 0 || (g.jobs <= POOL_QUEUE_JOBS / 2 && g.bytes <= POOL_QUEUE_BYTES / 2))
        {
            self.changed.notify_all();
        }
    }

    /// Wait until every job handed over so far is done.
    fn drain(&self) {
        let mut g = self.lock();
        while g.jobs > 0 {
            g.waiting += 1;
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
            g.waiting -= 1;
        }
    }
}

/// Counts a job as finished when dropped (also if its worker panics).
struct Done<'a>(&'a InFlight, u64);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

/// Jobs queued for a worker in one message: a send (and the worker's wake-up) per file costs
/// more than a small file's write.
const BATCH_JOBS: usize = 64;
const BATCH_BYTES: u64 = 1 << 20;

/// A worker's jobs not sent yet.
#[derive(Default)]
struct Batch {
    jobs: Vec<Job>,
    bytes: u64,
}

/// Writer threads, one queue each: the files of one directory go to one worker (`shard`), so
/// workers create files in different directories at once instead of queueing on one
/// directory's lock. Memory is bounded by `POOL_QUEUE_BYTES` of bodies in flight (counted
/// from `submit`, batched or sent).
struct WriterPool {
    txs: Vec<Sender<Vec<Job>>>,
    batches: Mutex<Vec<Batch>>,
    handles: Vec<JoinHandle<()>>,
    error: SharedError,
    inflight: Arc<InFlight>,
}

impl WriterPool {
    fn new(workers: usize, same_owner: bool) -> Self {
        let error: SharedError = Arc::new(Mutex::new(None));
        let inflight = Arc::new(InFlight::default());
        let umask = process_umask();
        let mut txs = Vec::new();
        let handles = (0..workers.max(1))
            .map(|_| {
                let (tx, rx) = unbounded::<Vec<Job>>();
                txs.push(tx);
                let error = error.clone();
                let inflight = inflight.clone();
                std::thread::spawn(move || {
                    for batch in rx.iter() {
                        for job in batch {
                            let _done = Done(&inflight, job.data.len() as u64);
                            let failed = error.lock().map_or(true, |g| g.is_some());
                            if failed {
                                continue; // the unpack fails anyway: drain the queue
                            }
                            if let Err(e) = job.run(same_owner, umask) {
                                record(&error, e);
                            }
                        }
                    }
                })
            })
            .collect();
        let batches = Mutex::new((0..txs.len()).map(|_| Batch::default()).collect());
        WriterPool {
            txs,
            batches,
            handles,
            error,
            inflight,
        }
    }

    fn closed() -> UnpackError {
        UnpackError::Io(
            "writer pool".into(),
            io::Error::other("writer pool stopped"),
        )
    }

    fn batches(&self) -> std::sync::MutexGuard<'_, Vec<Batch>> {
        self.batches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Send worker `i`'s batch, if any.
    fn send(&self, batches: &mut [Batch], i: usize) -> Result<(), UnpackError> {
        let batch = std::mem::take(&mut batches[i]);
        if batch.jobs.is_empty() {
            return Ok(());
        }
        let (n, bytes) = (batch.jobs.len(), batch.bytes);
        self.txs[i].send(batch.jobs).map_err(|_| {
            self.inflight.release_many(n, bytes);
            Self::closed()
        })
    }

    /// Send every batch.
    fn flush(&self) -> Result<(), UnpackError> {
        let mut batches = self.batches();
        for i in 0..batches.len() {
            self.send(&mut batches, i)?;
        }
        Ok(())
    }

    /// Queue a job on worker `shard` (modulo the pool size), waiting while the pool is full.
    fn submit(&self, job: Job, shard: u64) -> Result<(), UnpackError> {
        if let Some(e) = take(&self.error) {
            return Err(e);
        }
        if self.txs.is_empty() {
            return Err(Self::closed());
        }
        let bytes = job.data.len() as u64;
        if !self.inflight.try_acquire(bytes) {
            self.flush()?; // what waits in batches must reach the workers to be finished
            self.inflight.acquire(bytes);
        }
        let i = (shard % self.txs.len() as u64) as usize;
        let mut batches = self.batches();
        let b = &mut batches[i];
        b.jobs.push(job);
        b.bytes += bytes;
        if b.jobs.len() >= BATCH_JOBS || b.bytes >= BATCH_BYTES {
            self.send(&mut batches, i)?;
        }
        Ok(())
    }

    /// Wait for every queued job (so that the namespace is what the stream said so far).
    fn barrier(&self) -> Result<(), UnpackError> {
        self.flush()?;
        self.inflight.drain();
        match take(&self.error) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn join(&mut self) -> Result<(), UnpackError> {
        let flushed = self.flush();
        self.txs.clear();
        for h in self.handles.drain(..) {
            if h.join().is_err() {
                return Err(UnpackError::Io(
                    "writer pool".into(),
                    io::Error::other("writer thread panicked"),
                ));
            }
        }
        match take(&self.error) {
            Some(e) => Err(e),
            None => flushed,
        }
    }
}

impl Drop for WriterPool {
    fn drop(&mut self) {
        let _ = self.join();
    }
}

/// Which writer a file in directory `parent` goes to.
fn shard_of(parent: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    h.finish()
}

/// Hashes (optionally) and counts the compressed side of a layer.
struct HashingReader<R> {
    inner: CountingReader<R>,
    hasher: Option<StreamHasher>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Decompressed chunks in flight to the tar side and to the diff_id hasher.
const DECODE_CHUNKS: usize = 16;
const DECODE_CHUNK: usize = 1 << 20;

type Decoded = Result<(Option<String>, u64), UnpackError>;

/// The decoder thread: decompress `limited` into chunks for the tar side and the hasher; at the
/// end, drain the compressed source so that its digest covers every byte.
fn decode<R: Read>(
    mut limited: LimitedReader<zstd::stream::read::Decoder<'static, BufReader<HashingReader<R>>>>,
    tar_tx: Sender<Shared>,
    hash_tx: Option<Sender<Shared>>,
) -> Decoded {
    let pool = Pool::new(DECODE_CHUNK, 2 * DECODE_CHUNKS + 2);
    loop {
        let mut buf = pool.take();
        let mut filled = 0;
        while filled < buf.len() {
            match limited.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(UnpackError::Io("layer".into(), e)),
            }
        }
        if filled == 0 {
            break;
        }
        let chunk = pool.share(buf, filled);
        let hashed = match &hash_tx {
            Some(tx) => tx.send(chunk.clone()).is_ok(),
            None => true,
        };
        if !hashed || tar_tx.send(chunk).is_err() {
            // the tar side stopped (an error it reports): nothing more to do
            return Err(UnpackError::Io(
                "layer".into(),
                io::Error::new(io::ErrorKind::BrokenPipe, "tar reader stopped"),
            ));
        }
    }
    let uncompressed = limited.layer_bytes;
    let mut inner = limited.inner.finish();
    io::copy(&mut inner, &mut io::sink()).map_err(io_ctx("layer"))?;
    let hreader = inner.into_inner();
    Ok((hreader.hasher.map(|h| h.digest_string()), uncompressed))
}

/// Reads the chunks the decoder thread sends.
struct ChunkReader {
    rx: crossbeam_channel::Receiver<Shared>,
    chunk: Option<Shared>,
    pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(c) = &self.chunk {
                if self.pos < c.len() {
                    let n = buf.len().min(c.len() - self.pos);
                    buf[..n].copy_from_slice(&c[self.pos..self.pos + n]);
                    self.pos += n;
                    return Ok(n);
                }
            }
            self.chunk = None; // back to the pool once the hasher is done with it too
            match self.rx.recv() {
                Ok(c) => {
                    self.chunk = Some(c);
                    self.pos = 0;
                }
                Err(_) => return Ok(0), // decoder done (or failed: it reports why)
            }
        }
    }
}

/// Applies layers, in order, to one target directory.
pub struct Unpacker {
    root: SafeRoot,
    limits: Limits,
    budget: Arc<Budget>,
    pool: WriterPool,
    dirs: HashMap<String, Meta>,
    root_meta: Option<Meta>,
    stats: UnpackStats,
    /// The target was empty when we started: a name is free unless a layer wrote it or
    /// `SafeRoot` created it as a parent, so a writer can create it.
    fresh: bool,
    /// With `fresh`: the names earlier layers wrote (a later layer may replace them: those go
    /// the slow way). A restore of several layers, such as a checkpoint's batches, then creates
    /// its files on the writers in every layer, not only the first.
    earlier: HashSet<String>,
}

fn pax_mtime(value: &str) -> Option<i64> {
    let (neg, v) = match value.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    while digits.len() < 9 {
        digits.push('0');
    }
    let nanos: i64 = digits.parse().ok()?;
    let total = secs.checked_mul(1_000_000_000)?.checked_add(nanos)?;
    Some(if neg { -total } else { total })
}

impl Unpacker {
    /// `root` must exist and be a directory (normally a fresh one), not a symlink; it is opened
    /// once and everything after goes through that handle.
    pub fn new(root: &Path, limits: Limits, workers: usize) -> Result<Self, UnpackError> {
        Ok(Self::with_root(SafeRoot::open(root)?, limits, workers))
    }

    /// Unpack into the directory open as `dir` (`shown` names it in messages only).
    pub fn from_dir(
        dir: File,
        shown: PathBuf,
        limits: Limits,
        workers: usize,
    ) -> Result<Self, UnpackError> {
        let md = dir.metadata().map_err(io_ctx(shown.display()))?;
        if !md.is_dir() {
            return Err(UnpackError::Io(
                shown.display().to_string(),
                io::Error::new(io::ErrorKind::NotADirectory, "target is not a directory"),
            ));
        }
        Ok(Self::with_root(
            SafeRoot::from_file(dir, shown),
            limits,
            workers,
        ))
    }

    fn with_root(root: SafeRoot, limits: Limits, workers: usize) -> Self {
        let same_owner = limits.same_owner;
        let fresh = root
            .root()
            .entries()
            .is_ok_and(|mut it| it.next().is_none());
        Unpacker {
            fresh,
            root,
            limits,
            budget: Arc::new(Budget::default()),
            pool: WriterPool::new(workers, same_owner),
            dirs: HashMap::new(),
            root_meta: None,
            stats: UnpackStats::default(),
            earlier: HashSet::new(),
        }
    }

    pub fn budget(&self) -> Arc<Budget> {
        self.budget.clone()
    }

    fn stream_err(&self, what: &str) -> impl Fn(io::Error) -> UnpackError + '_ {
        let what = what.to_owned();
        move |e| match self.budget.violation() {
            Some(v) => UnpackError::Unsafe(v),
            None => UnpackError::Io(what.clone(), e),
        }
    }

    /// Remove whatever is at `rel` (a directory recursively, a symlink itself, never its target).
    fn clear(&mut self, rel: &str) -> Result<(), UnpackError> {
        let Some((parent, name)) = self.root.parent(rel, false)? else {
            return Ok(());
        };
        self.clear_in(&parent, name, rel)
    }

    /// `clear` with `rel`'s parent handle already open (`name` is `rel`'s last component).
    fn clear_in(&mut self, parent: &Dir, name: &str, rel: &str) -> Result<(), UnpackError> {
        match parent.symlink_metadata(name) {
            Ok(md) if md.is_dir() => {
                self.root.forget(rel);
                let prefix = format!("{rel}/");
                self.dirs.retain(|p, _| p != rel && !p.starts_with(&prefix));
                // cap-std removes the tree below the handle without following any symlink
                parent
                    .remove_dir_all(name)
                    .map_err(io_ctx(self.root.shown(rel)))
            }
            Ok(_) => parent
                .remove_file(name)
                .map_err(io_ctx(self.root.shown(rel))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(UnpackError::Io(self.root.shown(rel), e)),
        }
    }

    fn opaque(&mut self, dir: &str, written: &HashSet<String>) -> Result<(), UnpackError> {
        let Some(handle) = self.root.dir(dir, false, dir)? else {
            return Ok(());
        };
        let mut victims = Vec::new();
        for de in handle.entries().map_err(io_ctx(self.root.shown(dir)))? {
            let de = de.map_err(io_ctx(self.root.shown(dir)))?;
            let name = de.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            let rel = if dir.is_empty() {
                name.to_owned()
            } else {
                format!("{dir}/{name}")
            };
            if !written.contains(&rel) {
                victims.push((name.to_owned(), rel));
            }
        }
        for (name, rel) in victims {
            self.clear_in(&handle, &name, &rel)?;
        }
        Ok(())
    }

    /// Apply one layer read from `src` (compressed bytes).
    ///
    /// Like `zstd -dc | tar -x` plus checks: a decoder thread reads, hashes (blob digest) and
    /// decompresses `src`, enforcing the limits as bytes come out; when a diff_id is to be
    /// verified, a hasher thread computes it; this thread parses tar and applies entries (small
    /// file bodies going on to the writer pool).
    pub fn apply<R: Read + Send>(
        &mut self,
        src: R,
        spec: &LayerSpec,
        progress: &mut dyn FnMut(&UnpackStats) -> Result<(), UnpackError>,
    ) -> Result<LayerStats, UnpackError> {
        let hasher = match &spec.digest {
            Some(d) => {
                let (alg, _) = validate_digest(d).map_err(UnpackError::Digest)?;
                Some(StreamHasher::new(alg))
            }
            None => None,
        };
        let compressed = Arc::new(AtomicU64::new(0));
        let hreader = HashingReader {
            inner: CountingReader {
                inner: src,
                count: compressed.clone(),
            },
            hasher,
        };
        let decoder =
            zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(1 << 20, hreader))
                .map_err(io_ctx("zstd"))?;
        let limited = LimitedReader {
            inner: decoder,
            layer_bytes: 0,
            compressed: compressed.clone(),
            budget: self.budget.clone(),
            limits: self.limits.clone(),
            max_layer_bytes: spec.uncompressed_size,
        };
        let budget = self.budget.clone();
        let mut entries_in_layer = 0u64;

        let (tar_result, decoded, diff) = std::thread::scope(|s| {
            let (tar_tx, tar_rx) = bounded::<Shared>(DECODE_CHUNKS);
            let (hash_tx, hasher) = if spec.diff_id.is_some() {
                let (hash_tx, hash_rx) = bounded::<Shared>(DECODE_CHUNKS);
                let hasher = s.spawn(move || {
                    let mut h = StreamHasher::new(crate::digest::Algorithm::Sha256);
                    for chunk in hash_rx.iter() {
                        h.update(&chunk);
                    }
                    h.digest_string()
                });
                (Some(hash_tx), Some(hasher))
            } else {
                (None, None)
            };
            let decoder = s.spawn(move || decode(limited, tar_tx, hash_tx));
            let reader = ChunkReader {
                rx: tar_rx,
                chunk: None,
                pos: 0,
            };
            let tar_result = self.apply_tar(reader, &mut entries_in_layer, progress);
            // (the reader is gone: a decoder still sending stops at once)
            let decoded = decoder.join();
            let diff = hasher.map(|h| h.join()).transpose();
            (tar_result, decoded, diff)
        });
        let decoded = match decoded {
            Ok(r) => r,
            Err(_) => Err(UnpackError::Io(
                "zstd".into(),
                io::Error::other("decoder panicked"),
            )),
        };
        // A limit violation or read error explains whatever the tar side saw: report it first.
        if let Some(v) = budget.violation() {
            return Err(UnpackError::Unsafe(v));
        }
        // The decoder stops with "tar reader stopped" when the tar side failed first (a disk
        // error such as ENOSPC, an unsafe entry): then the tar side's error is the story.
        if let Err(UnpackError::Io(_, e)) = &decoded {
            if e.kind() == io::ErrorKind::BrokenPipe && tar_result.is_err() {
                return tar_result.map(|_| LayerStats::default());
            }
        }
        let (digest, uncompressed) = decoded?;
        tar_result?;
        let diff_id = diff
            .map_err(|_| UnpackError::Io("sha256".into(), io::Error::other("hasher panicked")))?;
        if let (Some(want), Some(got)) = (&spec.digest, &digest) {
            if want != got {
                return Err(UnpackError::Digest(format!("layer {want} hashes to {got}")));
            }
        }
        if let (Some(want), Some(diff_id)) = (&spec.diff_id, &diff_id) {
            if want != diff_id {
                return Err(UnpackError::Digest(format!(
                    "layer diff_id is {diff_id}, its descriptor says {want}"
                )));
            }
        }
        if let Some(want) = spec.uncompressed_size {
            if want != uncompressed {
                return Err(UnpackError::Digest(format!(
                    "layer is {uncompressed} bytes uncompressed, its descriptor says {want}"
                )));
            }
        }
        self.stats.layers += 1;
        self.sync_stats();
        progress(&self.stats)?;
        Ok(LayerStats {
            digest,
            diff_id,
            compressed: compressed.load(Ordering::Relaxed),
            uncompressed,
            entries: entries_in_layer,
        })
    }

    fn apply_tar(
        &mut self,
        reader: ChunkReader,
        entries_in_layer: &mut u64,
        progress: &mut dyn FnMut(&UnpackStats) -> Result<(), UnpackError>,
    ) -> Result<(), UnpackError> {
        let mut archive = tar::Archive::new(reader);
        let mut written: HashSet<String> = HashSet::new();
        {
            let entries = archive.entries().map_err(self.stream_err("tar"))?;
            for entry in entries {
                let mut entry = entry.map_err(self.stream_err("tar"))?;
                *entries_in_layer += 1;
                let n = self.budget.entries.fetch_add(1, Ordering::Relaxed) + 1;
                if n > self.limits.max_entries {
                    return Err(unsafe_err(format!(
                        "more than {} entries (limit)",
                        self.limits.max_entries
                    )));
                }
                self.entry(&mut entry, &mut written)?;
                if n.is_multiple_of(256) {
                    self.sync_stats();
                    progress(&self.stats)?;
                }
            }
        }
        // Drain what follows the end-of-archive marker: it is part of the diff_id and of the
        // blob digest, and limits apply to it as well.
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(self.stream_err("zstd"))?;
        if self.fresh {
            if self.earlier.is_empty() {
                self.earlier = written;
            } else {
                self.earlier.extend(written);
            }
        }
        // The next layer starts from the namespace this one left.
        self.pool.barrier()
    }

    fn sync_stats(&mut self) {
        self.stats.entries = self.budget.entries.load(Ordering::Relaxed);
        self.stats.bytes = self.budget.bytes.load(Ordering::Relaxed);
        self.stats.files = self.budget.files.load(Ordering::Relaxed);
        self.stats.file_bytes = self.budget.file_bytes.load(Ordering::Relaxed);
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        written: &mut HashSet<String>,
    ) -> Result<(), UnpackError> {
        let etype = entry.header().entry_type();
        if etype.is_pax_global_extensions() {
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let rel = clean_path(&raw)?;
        let header = entry.header();
        let mut meta = Meta {
            mode: header.mode().map_err(io_ctx("tar header"))? & 0o7777,
            uid: header.uid().map_err(io_ctx("tar header"))?,
            gid: header.gid().map_err(io_ctx("tar header"))?,
            mtime_ns: (header.mtime().map_err(io_ctx("tar header"))? as i64)
                .saturating_mul(1_000_000_000),
        };
        if let Some(exts) = entry.pax_extensions().map_err(self.stream_err("tar"))? {
            for ext in exts {
                let ext = ext.map_err(self.stream_err("tar"))?;
                if ext.key_bytes() == b"mtime" {
                    if let Some(ns) = ext.value().ok().and_then(pax_mtime) {
                        meta.mtime_ns = ns;
                    }
                }
            }
        }
        let Some(rel) = rel else {
            // `./`: the root directory's own metadata.
            if etype.is_dir() {
                self.root_meta = Some(meta);
                return Ok(());
            }
            return Err(unsafe_err("a non-directory entry names the target root"));
        };
        let (parent, name) = match rel.rfind('/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => ("", rel.as_str()),
        };
        // A name the stream already wrote (or a parent made for it) may still be in a writer's
        // hands; so may a hard link's target, and whatever a whiteout removes: let the writers
        // finish before anything looks at or changes such names.
        let seen = written.contains(&rel) || self.root.created(&rel);
        if seen || etype == EntryType::Link || name.starts_with(WHITEOUT_PREFIX) {
            self.pool.barrier()?;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            // Deleting through a symlinked parent would delete outside the target.
            if self.root.parent(&rel, false)?.is_none() {
                return Ok(()); // nothing below a missing directory to hide
            }
            if name == OPAQUE {
                let parent = parent.to_owned();
                return self.opaque(&parent, written);
            }
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(unsafe_err(format!("bad whiteout {rel:?}")));
            }
            let target = if parent.is_empty() {
                hidden.to_owned()
            } else {
                format!("{parent}/{hidden}")
            };
            if !written.contains(&target) {
                self.clear(&target)?;
            }
            return Ok(());
        }
        let Some((dir, name)) = self.root.parent(&rel, true)? else {
            return Err(unsafe_err(format!("{rel:?}: parent could not be created")));
        };
        let name = name.to_owned();
        let shown = self.root.shown(&rel);
        let same_owner = self.limits.same_owner;
        match etype {
            EntryType::Directory => {
                match dir.symlink_metadata(&name) {
                    Ok(md) if md.is_dir() => {}
                    Ok(_) => {
                        self.clear_in(&dir, &name, &rel)?;
                        dir.create_dir(&name).map_err(io_ctx(&shown))?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        dir.create_dir(&name).map_err(io_ctx(&shown))?;
                    }
                    Err(e) => return Err(UnpackError::Io(shown, e)),
                }
                self.dirs.insert(rel.clone(), meta);
            }
            EntryType::Regular | EntryType::Continuous
                if !seen
                    && self.fresh
                    && entry.size() <= POOL_MAX
                    && !self.earlier.contains(&rel) =>
            {
                // The usual case of a restore: a new name in a target that started empty. A
                // writer creates it (`O_CREAT|O_EXCL|O_NOFOLLOW` under the parent's handle),
                // in parallel with the other writers' directories.
                let size = entry.size();
                let mut data = Vec::with_capacity(size as usize);
                entry
                    .read_to_end(&mut data)
                    .map_err(self.stream_err(&rel))?;
                self.pool.submit(
                    Job {
                        target: Target::Create(dir, name),
                        data,
                        meta,
                        path: shown,
                    },
                    shard_of(parent),
                )?;
                self.budget.files.fetch_add(1, Ordering::Relaxed);
                self.budget.file_bytes.fetch_add(size, Ordering::Relaxed);
            }
            EntryType::Regular | EntryType::Continuous => {
                let mut opts = OpenOptions::new();
                opts.write(true)
                    .create_new(true)
                    .mode(0o600)
                    .follow(FollowSymlinks::No);
                let create = || dir.open_with(&name, &opts).map(|f| f.into_std());
                // Try first (the usual case: nothing there); replace whatever is there otherwise.
                let mut file = match create() {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        self.clear_in(&dir, &name, &rel)?;
                        create().map_err(io_ctx(&shown))?
                    }
                    Err(e) => return Err(UnpackError::Io(shown, e)),
                };
                let size = entry.size();
                if size <= POOL_MAX {
                    let mut data = Vec::with_capacity(size as usize);
                    entry
                        .read_to_end(&mut data)
                        .map_err(self.stream_err(&rel))?;
                    self.pool.submit(
                        Job {
                            target: Target::Open(file),
                            data,
                            meta,
                            path: shown,
                        },
                        shard_of(parent),
                    )?;
                } else {
                    let mut w = io::BufWriter::with_capacity(1 << 20, &mut file);
                    io::copy(entry, &mut w).map_err(self.stream_err(&rel))?;
                    w.flush().map_err(io_ctx(&shown))?;
                    drop(w);
                    set_file_meta(&file, &meta, same_owner).map_err(io_ctx(&shown))?;
                }
                self.budget.files.fetch_add(1, Ordering::Relaxed);
                self.budget.file_bytes.fetch_add(size, Ordering::Relaxed);
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_err(format!("symlink {rel:?} without a target")))?
                    .into_owned();
                if target.is_empty() || target.contains(&0) {
                    return Err(unsafe_err(format!("symlink {rel:?} has an invalid target")));
                }
                self.clear_in(&dir, &name, &rel)?;
                // symlinkat(2) by the last name under the parent's handle (the target is data:
                // nothing here ever follows it).
                rustix::fs::symlinkat(target.as_slice(), &*dir, name.as_str())
                    .map_err(|e| UnpackError::Io(shown.clone(), e.into()))?;
                self.set_link_meta(&dir, &name, &meta, &shown)?;
            }
            EntryType::Link => {
                let raw_target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_err(format!("hard link {rel:?} without a target")))?
                    .into_owned();
                let target = clean_path(&raw_target)?
                    .ok_or_else(|| unsafe_err(format!("hard link {rel:?} to the target root")))?;
                if target == rel {
                    return Err(unsafe_err(format!("hard link {rel:?} to itself")));
                }
                let Some((tdir, tname)) = self.root.parent(&target, false)? else {
                    return Err(unsafe_err(format!(
                        "hard link {rel:?} to missing {target:?}"
                    )));
                };
                match tdir.symlink_metadata(tname) {
                    Ok(md) if md.is_dir() => {
                        return Err(unsafe_err(format!("hard link {rel:?} to a directory")));
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(unsafe_err(format!(
                            "hard link {rel:?} to missing {target:?}"
                        )));
                    }
                }
                self.clear_in(&dir, &name, &rel)?;
                // linkat(2) without AT_SYMLINK_FOLLOW, handle to handle: links the entry
                // itself (a symlink stays a symlink), never its target.
                tdir.hard_link(tname, &dir, &name).map_err(io_ctx(&shown))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                if !self.limits.allow_devices {
                    return Err(unsafe_err(format!(
                        "{rel:?} is a device node or FIFO (not allowed)"
                    )));
                }
                self.clear_in(&dir, &name, &rel)?;
                let kind = match etype {
                    EntryType::Char => rustix::fs::FileType::CharacterDevice,
                    EntryType::Block => rustix::fs::FileType::BlockDevice,
                    _ => rustix::fs::FileType::Fifo,
                };
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                let err = |e: rustix::io::Errno| UnpackError::Io(shown.clone(), e.into());
                rustix::fs::mknodat(
                    &*dir,
                    name.as_str(),
                    kind,
                    rustix::fs::Mode::from_raw_mode(0o600),
                    rustix::fs::makedev(major, minor),
                )
                .map_err(err)?;
                if same_owner {
                    let (u, g) = meta.owner();
                    rustix::fs::chownat(&*dir, name.as_str(), u, g, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(err)?;
                }
                // fchmodat(2) cannot refuse a symlink on Linux; the node was made just now by
                // its name under our handle, in a tree only this restore can write to (the
                // root stays 0700 until finish).
                rustix::fs::chmodat(
                    &*dir,
                    name.as_str(),
                    rustix::fs::Mode::from_raw_mode(meta.mode as _),
                    AtFlags::empty(),
                )
                .map_err(err)?;
                rustix::fs::utimensat(
                    &*dir,
                    name.as_str(),
                    &meta.times(),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(err)?;
            }
            other => {
                return Err(unsafe_err(format!(
                    "{rel:?}: unsupported tar entry type {:?}",
                    other.as_byte() as char
                )));
            }
        }
        written.insert(rel);
        Ok(())
    }

    /// Owner and times of a symlink, by name under its parent's handle, never following it.
    fn set_link_meta(
        &self,
        dir: &Dir,
        name: &str,
        meta: &Meta,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let err = |e: rustix::io::Errno| UnpackError::Io(shown.to_owned(), e.into());
        if self.limits.same_owner {
            let (u, g) = meta.owner();
            rustix::fs::chownat(dir, name, u, g, AtFlags::SYMLINK_NOFOLLOW).map_err(err)?;
        }
        rustix::fs::utimensat(dir, name, &meta.times(), AtFlags::SYMLINK_NOFOLLOW).map_err(err)
    }

    /// Wait for every file write, then set directory metadata (deepest first), each through a
    /// handle opened component by component from the root's without following symlinks.
    pub fn finish(mut self) -> Result<UnpackStats, UnpackError> {
        self.pool.join()?;
        let mut dirs: Vec<(String, Meta)> = self.dirs.drain().collect();
        dirs.sort_by(|a, b| {
            let da = a.0.matches('/').count();
            let db = b.0.matches('/').count();
            db.cmp(&da).then_with(|| a.0.cmp(&b.0))
        });
        let same_owner = self.limits.same_owner;
        for (rel, meta) in &dirs {
            // replaced by a file or symlink in a later layer, or removed: nothing to set
            let (parent, name) = match self.root.parent(rel, false) {
                Ok(Some(p)) => p,
                Ok(None) | Err(UnpackError::Unsafe(_)) => continue,
                Err(e) => return Err(e),
            };
            // (cached handles may be O_PATH, which fchmod refuses: open the last name for real)
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let fd = match rustix::fs::openat(&*parent, name, flags, rustix::fs::Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOTDIR | Errno::LOOP | Errno::NOENT) => continue,
                Err(e) => return Err(UnpackError::Io(self.root.shown(rel), e.into())),
            };
            set_file_meta(&fd, meta, same_owner).map_err(io_ctx(self.root.shown(rel)))?;
        }
        if let Some(meta) = self.root_meta {
            set_file_meta(self.root.root(), &meta, same_owner)
                .map_err(io_ctx(self.root.shown("")))?;
        }
        self.sync_stats();
        Ok(self.stats.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::super::index::{diff, scan, Entry, Kind};
    use super::super::pack::{pack, PackOptions, PackProgress};
    use super::*;
    use filetime::FileTime;
    use std::fs::{self, Permissions};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn layer(root: &Path, entries: &[&Entry], wh: &[String], opq: &[String]) -> Vec<u8> {
        pack(
            root,
            entries,
            wh,
            opq,
            Vec::new(),
            &PackOptions::default(),
            &PackProgress::default(),
        )
        .expect("pack")
        .1
    }

    fn unpack_all(
        layers: &[Vec<u8>],
        dest: &Path,
        limits: Limits,
    ) -> Result<UnpackStats, UnpackError> {
        let mut u = Unpacker::new(dest, limits, 2)?;
        for l in layers {
            u.apply(l.as_slice(), &LayerSpec::default(), &mut |_| Ok(()))?;
        }
        u.finish()
    }

    fn same_tree(a: &Path, b: &Path) {
        let ea = scan(a, None).expect("scan a");
        let eb = scan(b, None).expect("scan b");
        assert_eq!(ea.len(), eb.len(), "entry count");
        for (x, y) in ea.iter().zip(eb.iter()) {
            assert_eq!(x.path, y.path);
            assert_eq!(x.kind, y.kind, "{}", x.path);
            assert_eq!(x.mode, y.mode, "{}", x.path);
            assert_eq!(x.size, y.size, "{}", x.path);
            assert_eq!(x.link, y.link, "{}", x.path);
            assert_eq!(x.mtime_ns, y.mtime_ns, "{}", x.path);
            assert_eq!(x.nlink, y.nlink, "{}", x.path);
            if x.kind == Kind::File {
                assert_eq!(
                    fs::read(a.join(&x.path)).ok(),
                    fs::read(b.join(&y.path)).ok(),
                    "{}",
                    x.path
                );
            }
        }
    }

    fn sample(r: &Path) {
        fs::create_dir_all(r.join("d/e/f")).expect("mkdir");
        fs::create_dir(r.join("empty")).expect("mkdir");
        fs::write(r.join("d/a file"), b"alpha").expect("write");
        fs::write(r.join("big"), vec![7u8; 3 << 20]).expect("write");
        fs::hard_link(r.join("big"), r.join("d/big2")).expect("link");
        std::os::unix::fs::symlink("/etc/passwd", r.join("abs")).expect("symlink");
        std::os::unix::fs::symlink("../big", r.join("d/rel")).expect("symlink");
        fs::set_permissions(r.join("d/a file"), Permissions::from_mode(0o4755)).expect("chmod");
        fs::set_permissions(r.join("d/e"), Permissions::from_mode(0o555)).expect("chmod");
        let t = FileTime::from_unix_time(1_600_000_000, 123_456_789);
        filetime::set_file_times(r.join("d/a file"), t, t).expect("utime");
    }

    #[test]
    fn round_trip_full_and_incremental() {
        let src = tempfile::tempdir().expect("tmp");
        let r = src.path();
        sample(r);
        let v1 = scan(r, None).expect("scan");
        let all: Vec<&Entry> = v1.iter().collect();
        let l1 = layer(r, &all, &[], &[]);
        // edits: delete a dir, dir -> file, file -> dir, new file
        fs::remove_file(r.join("d/rel")).expect("rm");
        fs::set_permissions(r.join("d/e"), Permissions::from_mode(0o755)).expect("chmod");
        fs::remove_dir_all(r.join("d/e")).expect("rm");
        fs::write(r.join("d/e"), b"now a file").expect("write");
        fs::remove_file(r.join("abs")).expect("rm");
        fs::create_dir(r.join("abs")).expect("mkdir");
        fs::write(r.join("abs/inner"), b"x").expect("write");
        let v2 = scan(r, None).expect("scan");
        let d = diff(&v1, &v2, false);
        let changed: Vec<&Entry> = d.changed.iter().map(|&i| &v2[i]).collect();
        let l2 = layer(r, &changed, &d.whiteouts, &d.opaque);
        let dest = tempfile::tempdir().expect("tmp");
        unpack_all(&[l1, l2], dest.path(), Limits::default()).expect("unpack");
        same_tree(r, dest.path());
        let big = fs::metadata(dest.path().join("big")).expect("stat");
        let big2 = fs::metadata(dest.path().join("d/big2")).expect("stat");
        assert_eq!(big.ino(), big2.ino());
    }

    fn raw_layer(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        let tar = b.into_inner().expect("tar");
        zstd::stream::encode_all(tar.as_slice(), 3).expect("zstd")
    }

    fn hdr(kind: EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    }

    fn set_raw_name(h: &mut tar::Header, name: &[u8]) {
        let g = h.as_gnu_mut().expect("gnu");
        g.name.fill(0);
        g.name[..name.len()].copy_from_slice(name);
    }

    fn set_raw_link(h: &mut tar::Header, name: &[u8]) {
        let g = h.as_gnu_mut().expect("gnu");
        g.linkname.fill(0);
        g.linkname[..name.len()].copy_from_slice(name);
    }

    fn refused(layers: &[Vec<u8>], limits: Limits) -> (tempfile::TempDir, tempfile::TempDir) {
        let base = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("tmp");
        let dest = base.path().join("dest");
        fs::create_dir(&dest).expect("mkdir");
        let err = unpack_all(layers, &dest, limits).expect_err("must be refused");
        assert!(matches!(err, UnpackError::Unsafe(_)), "{err}");
        (base, outside)
    }

    #[test]
    fn escapes_refused() {
        let abs = raw_layer(|b| {
            let mut h = hdr(EntryType::Regular, 1);
            set_raw_name(&mut h, b"/tmp/evil");
            h.set_cksum();
            b.append(&h, &b"x"[..]).expect("append");
        });
        refused(&[abs], Limits::default());
        let dotdot = raw_layer(|b| {
            let mut h = hdr(EntryType::Regular, 1);
            set_raw_name(&mut h, b"a/../../evil");
            h.set_cksum();
            b.append(&h, &b"x"[..]).expect("append");
        });
        refused(&[dotdot], Limits::default());
        let fifo = raw_layer(|b| {
            let mut h = hdr(EntryType::Fifo, 0);
            set_raw_name(&mut h, b"p");
            h.set_cksum();
            b.append(&h, io::empty()).expect("append");
        });
        refused(&[fifo], Limits::default());
    }

    #[test]
    fn symlink_then_write_through_refused() {
        let outside = tempfile::tempdir().expect("tmp");
        let target = outside.path().to_string_lossy().into_owned();
        let l = raw_layer(|b| {
            let mut h = hdr(EntryType::Symlink, 0);
            set_raw_name(&mut h, b"link");
            set_raw_link(&mut h, target.as_bytes());
            h.set_cksum();
            b.append(&h, io::empty()).expect("append");
            let mut h = hdr(EntryType::Regular, 4);
            set_raw_name(&mut h, b"link/pwned");
            h.set_cksum();
            b.append(&h, &b"evil"[..]).expect("append");
        });
        let (_b, _o) = refused(&[l], Limits::default());
        assert!(!outside.path().join("pwned").exists());
        assert_eq!(fs::read_dir(outside.path()).expect("ls").count(), 0);
    }

    #[test]
    fn root_swapped_for_symlink_writes_nothing_outside() {
        // The restore's temp directory replaced by a symlink after the unpacker opened it:
        // every write still lands in the directory it opened (held by its handle).
        let src = tempfile::tempdir().expect("tmp");
        sample(src.path());
        let all_entries = scan(src.path(), None).expect("scan");
        let all: Vec<&Entry> = all_entries.iter().collect();
        let l = layer(src.path(), &all, &[], &[]);
        let base = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("tmp");
        let dest = base.path().join("dest");
        fs::create_dir(&dest).expect("mkdir");
        let mut u = Unpacker::new(&dest, Limits::default(), 2).expect("open");
        fs::rename(&dest, base.path().join("moved")).expect("mv");
        std::os::unix::fs::symlink(outside.path(), &dest).expect("symlink");
        u.apply(l.as_slice(), &LayerSpec::default(), &mut |_| Ok(()))
            .expect("apply");
        u.finish().expect("finish");
        assert_eq!(fs::read_dir(outside.path()).expect("ls").count(), 0);
        same_tree(src.path(), &base.path().join("moved"));
    }

    #[test]
    fn bomb_refused_by_ratio_and_bytes() {
        let zeros = raw_layer(|b| {
            let h = {
                let mut h = hdr(EntryType::Regular, 200 << 20);
                set_raw_name(&mut h, b"zeros");
                h.set_cksum();
                h
            };
            b.append(&h, io::repeat(0).take(200 << 20)).expect("append");
        });
        assert!(zeros.len() < 1 << 20);
        refused(std::slice::from_ref(&zeros), Limits::default());
        let limits = Limits {
            max_ratio: 0,
            max_bytes: 10 << 20,
            ..Limits::default()
        };
        refused(&[zeros], limits);
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, name: &[u8], body: &[u8]) {
        let mut h = hdr(EntryType::Regular, body.len() as u64);
        set_raw_name(&mut h, name);
        h.set_cksum();
        b.append(&h, body).expect("append");
    }

    fn dir(b: &mut tar::Builder<Vec<u8>>, name: &[u8]) {
        let mut h = hdr(EntryType::Directory, 0);
        h.set_mode(0o755);
        set_raw_name(&mut h, name);
        h.set_cksum();
        b.append(&h, io::empty()).expect("append");
    }

    /// One first layer (into an empty target, so writers create the files) that reuses names:
    /// the result must be what applying the entries one by one in order gives.
    #[test]
    fn reused_names_in_a_first_layer_apply_in_stream_order() {
        let l = raw_layer(|b| {
            // many files over many directories (several writers at once)
            for d in 0..40 {
                dir(b, format!("d{d}").as_bytes());
                for f in 0..50 {
                    file(
                        b,
                        format!("d{d}/f{f}").as_bytes(),
                        format!("{d}/{f}").as_bytes(),
                    );
                }
            }
            // a hard link to a file just handed to a writer
            file(b, b"d0/src", b"linked");
            let mut h = hdr(EntryType::Link, 0);
            set_raw_name(&mut h, b"d1/hard");
            set_raw_link(&mut h, b"d0/src");
            h.set_cksum();
            b.append(&h, io::empty()).expect("append");
            // a file, then the same name as a directory with a file in it
            file(b, b"d2/x", b"first");
            dir(b, b"d2/x");
            file(b, b"d2/x/inner", b"inner");
            // a file under a parent made implicitly, then that parent replaced by a file
            file(b, b"p/q", b"q");
            file(b, b"p", b"p is a file");
            // the same file twice: the second wins
            file(b, b"d3/twice", b"one");
            file(b, b"d3/twice", b"two");
        });
        let base = tempfile::tempdir().expect("tmp");
        let dest = base.path().join("dest");
        fs::create_dir(&dest).expect("mkdir");
        unpack_all(&[l], &dest, Limits::default()).expect("unpack");
        for d in 0..40 {
            for f in 0..50 {
                let got = fs::read(dest.join(format!("d{d}/f{f}"))).expect("read");
                assert_eq!(got, format!("{d}/{f}").as_bytes());
            }
        }
        assert_eq!(fs::read(dest.join("d1/hard")).expect("hard"), b"linked");
        let (a, b) = (
            fs::metadata(dest.join("d0/src")).expect("src"),
            fs::metadata(dest.join("d1/hard")).expect("hard"),
        );
        assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
        assert!(dest.join("d2/x").is_dir());
        assert_eq!(fs::read(dest.join("d2/x/inner")).expect("inner"), b"inner");
        assert_eq!(fs::read(dest.join("p")).expect("p"), b"p is a file");
        assert_eq!(fs::read(dest.join("d3/twice")).expect("twice"), b"two");
    }

    #[test]
    fn more_files_than_the_pool_holds_all_arrive() {
        // Over POOL_QUEUE_JOBS files in one layer: the producer fills the pool, flushes its
        // batches and waits for the writers to drain it, many times over.
        let n = 2 * POOL_QUEUE_JOBS + 123;
        let l = raw_layer(|b| {
            for i in 0..n {
                file(
                    b,
                    format!("d{}/f{i}", i % 7).as_bytes(),
                    i.to_string().as_bytes(),
                );
            }
        });
        let base = tempfile::tempdir().expect("tmp");
        let dest = base.path().join("dest");
        fs::create_dir(&dest).expect("mkdir");
        unpack_all(&[l], &dest, Limits::default()).expect("unpack");
        for i in 0..n {
            let got = fs::read(dest.join(format!("d{}/f{i}", i % 7))).expect("read");
            assert_eq!(got, i.to_string().as_bytes());
        }
    }

    #[test]
    fn later_layers_into_a_fresh_target_replace_what_earlier_ones_wrote() {
        let first = raw_layer(|b| {
            for d in 0..8 {
                dir(b, format!("d{d}").as_bytes());
                for f in 0..20 {
                    file(b, format!("d{d}/f{f}").as_bytes(), b"one");
                }
            }
            file(b, b"gone", b"deleted by the second layer");
            file(b, b"back", b"deleted, then written again");
        });
        let second = raw_layer(|b| {
            for d in 0..8 {
                for f in 10..30 {
                    // f10..f19 replace the first layer's files, f20..f29 are new names
                    file(b, format!("d{d}/f{f}").as_bytes(), b"two");
                }
            }
            file(b, b".wh.gone", b"");
            file(b, b".wh.back", b"");
            file(b, b"d0", b"a directory replaced by a file");
        });
        let third = raw_layer(|b| {
            file(b, b"back", b"three");
            dir(b, b"d0");
            file(b, b"d0/new", b"three");
        });
        let base = tempfile::tempdir().expect("tmp");
        let dest = base.path().join("dest");
        fs::create_dir(&dest).expect("mkdir");
        unpack_all(&[first, second, third], &dest, Limits::default()).expect("unpack");
        for d in 1..8 {
            for f in 0..30 {
                let want: &[u8] = if f < 10 { b"one" } else { b"two" };
                let got = fs::read(dest.join(format!("d{d}/f{f}"))).expect("read");
                assert_eq!(got, want, "d{d}/f{f}");
            }
        }
        assert!(!dest.join("gone").exists());
        assert_eq!(fs::read(dest.join("back")).expect("back"), b"three");
        let mut d0: Vec<_> = fs::read_dir(dest.join("d0"))
            .expect("d0")
            .map(|e| e.expect("entry").file_name())
            .collect();
        d0.sort();
        assert_eq!(d0, vec![std::ffi::OsString::from("new")]);
    }

    #[test]
    fn pax_mtime_parse() {
        assert_eq!(pax_mtime("1.5"), Some(1_500_000_000));
        assert_eq!(pax_mtime("-1.5"), Some(-1_500_000_000));
        assert_eq!(pax_mtime("12"), Some(12_000_000_000));
        assert_eq!(pax_mtime("1.123456789123"), Some(1_123_456_789));
        assert_eq!(pax_mtime("x"), None);
    }
}
