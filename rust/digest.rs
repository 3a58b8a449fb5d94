//! Streaming content digests: sha256 (default), sha512 and blake3.
//!
//! The pure-Rust half (`Algorithm`, `StreamHasher`, `hash_path`, `copy_hashed`) is used by the
//! other Rust modules and tested by `cargo test`; the `Py*` half exposes it to Python with the
//! GIL released around anything larger than `GIL_RELEASE_THRESHOLD`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyMemoryView;
use sha2::Digest as _;

use crate::errors::InvalidDigestError;

/// Inputs at least this large are hashed with the GIL released.
pub const GIL_RELEASE_THRESHOLD: usize = 64 * 1024;
/// Read size for streaming files: large enough to amortise syscalls, small enough for L2.
pub const READ_CHUNK: usize = 1 << 20;
/// Above this size blake3 hashes with all cores (rayon).
const BLAKE3_PARALLEL_MIN: u64 = 1 << 20;
/// blake3 chunks at least this large are hashed with rayon (below it threads cost more than
/// they save, per the blake3 docs).
const BLAKE3_RAYON_CHUNK: usize = 128 * 1024;
/// Buffers in flight between the read+hash thread and the write thread of `copy_path_hashed`:
/// peak buffer memory is `(COPY_BUFFERS + 2) * READ_CHUNK`.
pub const COPY_BUFFERS: usize = 4;
/// `copy_path_hashed` starts writeback of the destination every this many bytes, so the final
/// fsync has little left to do and dirty page cache stays bounded.
pub const WRITEBACK_EVERY: u64 = 8 << 20;
/// Read size for parallel blake3: enough 1 KiB chunks for every core to get a large subtree.
const BLAKE3_READ_CHUNK: usize = 8 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Sha256,
    Sha512,
    Blake3,
}

impl Algorithm {
    pub fn parse(name: &str) -> Option<Algorithm> {
        match name {
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            "blake3" => Some(Algorithm::Blake3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
            Algorithm::Blake3 => "blake3",
        }
    }

    /// Length of the lowercase hex encoding.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 | Algorithm::Blake3 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// Validate `algorithm:hex` per the OCI digest grammar restricted to the algorithms we support.
pub fn validate_digest(s: &str) -> Result<(Algorithm, &str), String> {
    let (alg, hex) = s
        .split_once(':')
        .ok_or_else(|| format!("invalid digest {s:?}: expected algorithm:hex"))?;
    let algorithm = Algorithm::parse(alg)
        .ok_or_else(|| format!("invalid digest {s:?}: unsupported algorithm {alg:?}"))?;
    if hex.len() != algorithm.hex_len() {
        return Err(format!(
            "invalid digest {s:?}: {alg} needs {} hex characters, got {}",
            algorithm.hex_len(),
            hex.len()
        ));
    }
    if !hex
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!(
            "invalid digest {s:?}: encoded part must be lowercase hex"
        ));
    }
    Ok((algorithm, hex))
}

#[derive(Clone)]
pub enum StreamHasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
    Blake3(Box<blake3::Hasher>),
}

impl StreamHasher {
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => StreamHasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => StreamHasher::Sha512(sha2::Sha512::new()),
            Algorithm::Blake3 => StreamHasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            StreamHasher::Sha256(_) => Algorithm::Sha256,
            StreamHasher::Sha512(_) => Algorithm::Sha512,
            StreamHasher::Blake3(_) => Algorithm::Blake3,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            StreamHasher::Sha256(h) => h.update(data),
            StreamHasher::Sha512(h) => h.update(data),
            StreamHasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    /// Like `update`, but a large blake3 chunk is hashed with every core (rayon). The sha2
    /// family is inherently serial; sha2 uses the SHA-NI instructions when the CPU has them.
    pub fn update_parallel(&mut self, data: &[u8]) {
        match self {
            StreamHasher::Blake3(h) if data.len() >= BLAKE3_RAYON_CHUNK => {
                h.update_rayon(data);
            }
            _ => self.update(data),
        }
    }

    /// Hex digest of everything so far; the hasher stays usable.
    pub fn hex(&self) -> String {
        match self {
            StreamHasher::Sha256(h) => hex::encode(h.clone().finalize()),
            StreamHasher::Sha512(h) => hex::encode(h.clone().finalize()),
            StreamHasher::Blake3(h) => h.finalize().to_hex().to_string(),
        }
    }

    /// `algorithm:hex`.
    pub fn digest_string(&self) -> String {
        format!("{}:{}", self.algorithm().name(), self.hex())
    }
}

/// Hash a whole reader; returns (hex, bytes read).
pub fn hash_reader<R: Read>(algorithm: Algorithm, mut reader: R) -> io::Result<(String, u64)> {
    let mut hasher = StreamHasher::new(algorithm);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update_parallel(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.hex(), total))
}

/// Tell the kernel we read `file` once, front to back (bigger readahead on cold files).
fn advise_sequential(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: plain syscall on a valid descriptor; failure only loses a hint.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// Start writeback of `len` bytes at `offset` without waiting for it (Linux); elsewhere a no-op.
/// Failure only loses the early start (the caller's fsync still makes the data durable).
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::unix::io::AsRawFd;
    let _ = start_writeback_fd(file.as_raw_fd(), offset, len);
}

fn start_writeback_fd(fd: std::os::unix::io::RawFd, offset: u64, len: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let off = libc::off64_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let n = libc::off64_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: plain syscall; a bad descriptor or range only makes it fail.
        if unsafe { libc::sync_file_range(fd, off, n, libc::SYNC_FILE_RANGE_WRITE) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (fd, offset, len);
    Ok(())
}

/// Hash a file by path. blake3 on large files hashes big read buffers with every core.
///
/// Reads, not a memory map: a file truncated by someone else while we hash it must give a
/// wrong digest or an error, never a SIGBUS that kills the whole process.
pub fn hash_path(algorithm: Algorithm, path: &Path) -> io::Result<(String, u64)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    advise_sequential(&file);
    if algorithm == Algorithm::Blake3 && len >= BLAKE3_PARALLEL_MIN {
        return blake3_parallel_reader(file);
    }
    hash_reader(algorithm, file)
}

/// blake3 over a reader, each large buffer hashed by all cores (rayon).
pub fn blake3_parallel_reader<R: Read>(mut reader: R) -> io::Result<(String, u64)> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; BLAKE3_READ_CHUNK];
    let mut total = 0u64;
    loop {
        // Fill the whole buffer (short reads happen) so each rayon pass gets plenty of work.
        let mut filled = 0;
        while filled < buf.len() {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            break;
        }
        hasher.update_rayon(&buf[..filled]);
        total += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    Ok((hasher.finalize().to_hex().to_string(), total))
}

/// Copy `src` into `dst` while hashing it, in one read of the source (the caller syncs `dst`).
pub fn copy_hashed<R: Read, W: Write>(
    algorithm: Algorithm,
    mut src: R,
    dst: &mut W,
) -> io::Result<(String, u64)> {
    let mut hasher = StreamHasher::new(algorithm);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut total = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n])?;
        total += n as u64;
    }
    dst.flush()?;
    Ok((hasher.hex(), total))
}

/// Alignment of buffers, offsets and lengths for `O_DIRECT` writes (covers 512 B and 4 KiB
/// logical blocks).
const DIRECT_ALIGN: usize = 4096;
/// Files at least this large are written with `O_DIRECT` where the filesystem allows it.
pub const DIRECT_MIN: u64 = 8 << 20;

/// A `READ_CHUNK` window of a heap buffer, aligned to `DIRECT_ALIGN` (no unsafe allocation:
/// the Vec is over-allocated and the window starts at the first aligned byte).
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new() -> Self {
        let raw = vec![0u8; READ_CHUNK + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        AlignedBuf { raw, start }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + READ_CHUNK]
    }

    fn get(&self, n: usize) -> &[u8] {
        &self.raw[self.start..self.start + n]
    }
}

/// Fill `buf` from `input` (short only at end of file), so that every chunk but the last is a
/// whole number of `DIRECT_ALIGN` blocks.
fn read_full<R: Read>(input: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The destination of `copy_path_hashed`: direct I/O for large files where the filesystem
/// supports it (no page-cache copy, nothing left for fsync to flush, the cache not flooded by
/// a blob just stored), buffered with early writeback otherwise or as soon as direct I/O
/// refuses a write (unaligned tail, filesystem quirks).
struct Sink {
    file: File,
    direct: bool,
    written: u64,
    flushed: u64,
}

impl Sink {
    fn new(file: File, want_direct: bool) -> Self {
        let mut sink = Sink {
            file,
            direct: false,
            written: 0,
            flushed: 0,
        };
        if want_direct {
            sink.direct = sink.set_direct(true);
        }
        sink
    }

    /// Switch `O_DIRECT` on or off; false when the filesystem refuses (tmpfs, some FUSE).
    fn set_direct(&mut self, on: bool) -> bool {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::io::AsRawFd;
            let fd = self.file.as_raw_fd();
            // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
            let ok = unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFL);
                flags >= 0 && {
                    let new = if on {
                        flags | libc::O_DIRECT
                    } else {
                        flags & !libc::O_DIRECT
                    };
                    libc::fcntl(fd, libc::F_SETFL, new) == 0
                }
            };
            self.direct = on && ok;
            ok
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = on;
            self.direct = false;
            false
        }
    }

    fn write(&mut self, mut data: &[u8], sync: bool) -> io::Result<()> {
        if self.direct && !data.len().is_multiple_of(DIRECT_ALIGN) {
            self.set_direct(false); // the unaligned tail goes through the page cache
        }
        while !data.is_empty() {
            match self.file.write(data) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(k) => {
                    data = &data[k..];
                    self.written += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // EINVAL from a direct write: alignment the device wants that we did not meet.
                Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    self.set_direct(false);
                }
                Err(e) => return Err(e),
            }
        }
        if sync && !self.direct && self.written - self.flushed >= WRITEBACK_EVERY {
            start_writeback(&self.file, self.flushed, self.written - self.flushed);
            self.flushed = self.written;
        }
        Ok(())
    }
}

/// Write every buffer received, hand it back for reuse; fsync at the end when `sync`.
fn write_buffers(
    mut sink: Sink,
    full: Receiver<(AlignedBuf, usize)>,
    empty: SyncSender<AlignedBuf>,
    sync: bool,
) -> io::Result<()> {
    for (buf, n) in full {
        sink.write(buf.get(n), sync)?;
        // The reader may have finished and dropped its end: then the buffer is simply freed.
        let _ = empty.send(buf);
    }
    if sync {
        sink.file.sync_all()?;
    }
    Ok(())
}

/// Copy the file at `src` to a new file `dst` (created, must not exist), hashing exactly the
/// bytes that are written, in one read of the source; `dst` is fsynced when `sync`.
///
/// The caller's thread reads and hashes; a second thread writes, so hashing and writing overlap
/// (one pass costs max(hash, write) rather than their sum). At most `COPY_BUFFERS + 2` buffers
/// of `READ_CHUNK` bytes exist at once. Files of `DIRECT_MIN` bytes or more are written with
/// `O_DIRECT` where the filesystem supports it; otherwise writeback of `dst` is started every
/// `WRITEBACK_EVERY` bytes, so the final fsync does not wait for the whole file.
///
/// The digest is of the bytes handed to the writer, never of a second read of `src`: a source
/// modified during the copy cannot produce a blob whose content differs from its digest.
pub fn copy_path_hashed(
    algorithm: Algorithm,
    src: &Path,
    dst: &Path,
    sync: bool,
) -> io::Result<(String, u64)> {
    let mut input = File::open(src)?;
    advise_sequential(&input);
    let direct = input.metadata()?.len() >= DIRECT_MIN;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    copy_into(algorithm, &mut input, Sink::new(out, direct), sync).inspect_err(|_| {
        // We created `dst`: leave nothing half-written behind.
        let _ = std::fs::remove_file(dst);
    })
}

/// Copy the file at `src` into `out` (an open, empty file owned by the caller) while hashing,
/// then fsync `out`. Returns (hex, size). The caller keeps `out` and whatever lock it holds on it
/// (the writer thread works on a duplicate descriptor of the same open file).
pub fn copy_path_synced(
    algorithm: Algorithm,
    src: &Path,
    out: &mut File,
) -> io::Result<(String, u64)> {
    let mut input = File::open(src)?;
    advise_sequential(&input);
    let direct = input.metadata()?.len() >= DIRECT_MIN;
    copy_into(
        algorithm,
        &mut input,
        Sink::new(out.try_clone()?, direct),
        true,
    )
}

fn copy_into(
    algorithm: Algorithm,
    input: &mut File,
    sink: Sink,
    sync: bool,
) -> io::Result<(String, u64)> {
    let (full_tx, full_rx) = sync_channel::<(AlignedBuf, usize)>(COPY_BUFFERS);
    let (empty_tx, empty_rx) = sync_channel::<AlignedBuf>(COPY_BUFFERS + 2);
    for _ in 0..COPY_BUFFERS + 1 {
        // Cannot fail: the channel has room and its receiver is alive.
        let _ = empty_tx.send(AlignedBuf::new());
    }
    let writer = std::thread::Builder::new()
        .name("clawstore-copy-writer".into())
        .spawn(move || write_buffers(sink, full_rx, empty_tx, sync))?;

    let mut hasher = StreamHasher::new(algorithm);
    let mut total = 0u64;
    let read_result: io::Result<()> = loop {
        // Err: the writer stopped (an error it reports at join) and dropped its channel ends.
        let Ok(mut buf) = empty_rx.recv() else {
            break Ok(());
        };
        let n = match read_full(input, buf.as_mut()) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        hasher.update_parallel(buf.get(n));
        total += n as u64;
        if full_tx.send((buf, n)).is_err() {
            break Ok(()); // writer gone: its error comes from join below
        }
    };
    drop(full_tx);
    let write_result = writer
        .join()
        .map_err(|_| io::Error::other("copy writer thread panicked"))?;
    read_result.and(write_result)?;
    Ok((hasher.hex(), total))
}

/// Hash then write every buffer received (the stream variant's second thread); hand each back
/// for reuse. Returns (hex, size) of exactly the bytes written.
fn hash_and_write_buffers(
    mut sink: Sink,
    full: Receiver<(AlignedBuf, usize)>,
    empty: SyncSender<AlignedBuf>,
    algorithm: Algorithm,
) -> io::Result<(String, u64)> {
    let mut hasher = StreamHasher::new(algorithm);
    let mut total = 0u64;
    for (buf, n) in full {
        hasher.update_parallel(buf.get(n));
        sink.write(buf.get(n), false)?;
        total += n as u64;
        let _ = empty.send(buf);
    }
    Ok((hasher.hex(), total))
}

/// Copy a stream (a network body) into `out`, hashing exactly the bytes written; `out` is not
/// synced. The caller's thread receives whole `READ_CHUNK` buffers while a second thread hashes
/// and writes the previous ones, so receiving overlaps hashing and writing. With `direct`, the
/// file is written with `O_DIRECT` where the filesystem allows it (the same `Sink` as file
/// copies: whole aligned buffers direct, the tail and any refusal through the page cache).
pub fn copy_reader_hashed<R: Read>(
    algorithm: Algorithm,
    input: &mut R,
    out: File,
    direct: bool,
) -> io::Result<(String, u64)> {
    let (full_tx, full_rx) = sync_channel::<(AlignedBuf, usize)>(COPY_BUFFERS);
    let (empty_tx, empty_rx) = sync_channel::<AlignedBuf>(COPY_BUFFERS + 2);
    for _ in 0..COPY_BUFFERS + 1 {
        let _ = empty_tx.send(AlignedBuf::new());
    }
    let sink = Sink::new(out, direct);
    let writer = std::thread::Builder::new()
        .name("clawstore-get-writer".into())
        .spawn(move || hash_and_write_buffers(sink, full_rx, empty_tx, algorithm))?;
    let read_result: io::Result<()> = loop {
        let Ok(mut buf) = empty_rx.recv() else {
            break Ok(()); // the writer stopped: its error comes from join below
        };
        let n = match read_full(input, buf.as_mut()) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        if full_tx.send((buf, n)).is_err() {
            break Ok(());
        }
    };
    drop(full_tx);
    let written = writer
        .join()
        .map_err(|_| io::Error::other("download writer thread panicked"))?;
    read_result?;
    written
}

/// A Python binary stream as a `Read`: each read takes the GIL and calls `readinto` on a
/// memoryview of our buffer (the stream releases the GIL while it waits on its socket). A
/// Python exception is kept, to be raised as itself once the copy has stopped.
struct PyReader {
    obj: PyObject,
    err: Option<PyErr>,
}

impl Read for PyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let obj = &self.obj;
        Python::with_gil(|py| -> PyResult<usize> {
            // SAFETY: the memoryview covers `buf`, exclusively ours for this call, and is
            // released before we return.
            let mv = unsafe {
                let p = pyo3::ffi::PyMemoryView_FromMemory(
                    buf.as_mut_ptr() as *mut std::os::raw::c_char,
                    buf.len() as pyo3::ffi::Py_ssize_t,
                    pyo3::ffi::PyBUF_WRITE,
                );
                Bound::from_owned_ptr_or_err(py, p)?
            };
            let r = obj.bind(py).call_method1("readinto", (&mv,));
            let _ = mv.call_method0("release");
            let r = r?;
            if r.is_none() {
                return Err(PyValueError::new_err(
                    "non-blocking stream returned no data; use a blocking binary stream",
                ));
            }
            let n: usize = r.extract()?;
            if n > buf.len() {
                return Err(PyValueError::new_err(
                    "stream readinto() reported more than asked",
                ));
            }
            Ok(n)
        })
        .map_err(|e| {
            self.err = Some(e);
            io::Error::other("the stream raised an exception")
        })
    }
}

pub fn parse_algorithm(name: &str) -> PyResult<Algorithm> {
    Algorithm::parse(name).ok_or_else(|| {
        InvalidDigestError::new_err(format!(
            "unsupported digest algorithm {name:?} (expected sha256, sha512 or blake3)"
        ))
    })
}

pub fn io_err(context: &str, e: io::Error) -> PyErr {
    PyOSError::new_err((e.raw_os_error().unwrap_or(0), format!("{context}: {e}")))
}

/// Borrow a contiguous byte buffer from any buffer-protocol object without copying.
///
/// Safety contract: the `PyBuffer` keeps the exporter alive and its memory pinned; as with
/// hashlib and blake3-py, a caller that mutates the object from another thread while we hash
/// with the GIL released gets an unspecified digest, never memory unsafety from us.
pub fn with_buffer<T>(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    f: impl FnOnce(&[u8]) -> T + Send,
) -> PyResult<T>
where
    T: Send,
{
    let buf: PyBuffer<u8> = match PyBuffer::get(data) {
        Ok(b) => b,
        // A typed buffer (array('I'), a numpy array, memoryview.cast('I')): hash its bytes, as
        // hashlib does, through a zero-copy byte view of it (TypeError if not C-contiguous).
        Err(_) => PyBuffer::get(&PyMemoryView::from(data)?.call_method1("cast", ("B",))?)?,
    };
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err("buffer must be C-contiguous"));
    }
    let len = buf.len_bytes();
    let ptr = buf.buf_ptr() as usize;
    // SAFETY: ptr/len describe the exporter's memory, held alive by `buf` until after `f` returns.
    let run = move || {
        let slice = if len == 0 {
            &[][..]
        } else {
            unsafe { std::slice::from_raw_parts(ptr as *const u8, len) }
        };
        f(slice)
    };
    let out = if len >= GIL_RELEASE_THRESHOLD {
        py.allow_threads(run)
    } else {
        run()
    };
    drop(buf);
    Ok(out)
}

/// A streaming hasher: `update` with any bytes-like object, `hexdigest`/`digest` at any point.
#[pyclass(name = "Hasher", module = "clawstore._core")]
#[derive(Clone)]
pub struct PyHasher {
    inner: StreamHasher,
    size: u64,
}

#[pymethods]
impl PyHasher {
    #[new]
    #[pyo3(signature = (algorithm = "sha256"))]
    fn new(algorithm: &str) -> PyResult<Self> {
        Ok(PyHasher {
            inner: StreamHasher::new(parse_algorithm(algorithm)?),
            size: 0,
        })
    }

    fn update(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        // A field borrow is Send, so the state is updated in place, with the GIL released for
        // large buffers (PyO3's borrow flag keeps other threads off this object meanwhile).
        let inner = &mut self.inner;
        let n = with_buffer(py, data, move |b| {
            inner.update(b);
            b.len()
        })?;
        self.size += n as u64;
        Ok(())
    }

    fn copy(&self) -> Self {
        self.clone()
    }

    fn hexdigest(&self) -> String {
        self.inner.hex()
    }

    /// `algorithm:hex` of everything hashed so far.
    fn digest(&self) -> String {
        self.inner.digest_string()
    }

    #[getter]
    fn algorithm(&self) -> &'static str {
        self.inner.algorithm().name()
    }

    /// Number of bytes hashed so far.
    #[getter]
    fn size(&self) -> u64 {
        self.size
    }
}

/// Hex digest of a bytes-like object.
#[pyfunction]
#[pyo3(signature = (data, algorithm = "sha256"))]
fn digest_bytes(py: Python<'_>, data: &Bound<'_, PyAny>, algorithm: &str) -> PyResult<String> {
    let alg = parse_algorithm(algorithm)?;
    with_buffer(py, data, move |b| {
        if alg == Algorithm::Blake3 && b.len() >= BLAKE3_PARALLEL_MIN as usize {
            let mut h = blake3::Hasher::new();
            h.update_rayon(b);
            return h.finalize().to_hex().to_string();
        }
        let mut h = StreamHasher::new(alg);
        h.update(b);
        h.hex()
    })
}

/// (hex digest, size) of a file, read once with the GIL released.
#[pyfunction]
#[pyo3(signature = (path, algorithm = "sha256"))]
fn digest_file(
    py: Python<'_>,
    path: std::path::PathBuf,
    algorithm: &str,
) -> PyResult<(String, u64)> {
    let alg = parse_algorithm(algorithm)?;
    py.allow_threads(|| hash_path(alg, &path))
        .map_err(|e| io_err(&path.display().to_string(), e))
}

/// Copy the file at `src` to a new file at `dst` (which must not exist), hashing in the same
/// pass with reading and writing overlapped; fsyncs `dst`. Returns (hex digest, size).
/// On error `dst` is removed.
#[pyfunction]
#[pyo3(signature = (src, dst, algorithm = "sha256"))]
fn copy_file_hashed(
    py: Python<'_>,
    src: std::path::PathBuf,
    dst: std::path::PathBuf,
    algorithm: &str,
) -> PyResult<(String, u64)> {
    let alg = parse_algorithm(algorithm)?;
    py.allow_threads(|| copy_path_hashed(alg, &src, &dst, true))
        .map_err(|e| io_err(&format!("{} -> {}", src.display(), dst.display()), e))
}

/// Receive a binary stream (anything with `readinto`, e.g. an S3 GET body) into the open file
/// `fd` (the caller keeps its descriptor; writes go to a duplicate, from its current offset),
/// hashing exactly the bytes written, with the GIL released except inside `readinto`. Files of
/// `DIRECT_MIN` bytes or more (`size_hint`) are written with `O_DIRECT` where the filesystem
/// allows it. Not fsynced. Returns (hex digest, size); an exception of the stream is raised as is.
#[pyfunction]
#[pyo3(signature = (src, fd, algorithm = "sha256", size_hint = 0))]
fn copy_stream_hashed(
    py: Python<'_>,
    src: PyObject,
    fd: i32,
    algorithm: &str,
    size_hint: u64,
) -> PyResult<(String, u64)> {
    use std::os::unix::io::FromRawFd;
    let alg = parse_algorithm(algorithm)?;
    // SAFETY: dup of a descriptor the caller holds open; the new one is owned by `out` alone.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io_err("dup", io::Error::last_os_error()));
    }
    // SAFETY: `dup` is a fresh descriptor nobody else owns.
    let out = unsafe { File::from_raw_fd(dup) };
    let mut reader = PyReader {
        obj: src,
        err: None,
    };
    let result =
        py.allow_threads(|| copy_reader_hashed(alg, &mut reader, out, size_hint >= DIRECT_MIN));
    if let Some(e) = reader.err.take() {
        return Err(e);
    }
    result.map_err(|e| io_err("download", e))
}

/// Start writing `length` bytes at `offset` of the open file `fd` back to disk without waiting
/// (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`; elsewhere nothing). Writers of large files
/// call it as they go, so that their final fsync has little left to wait for. Only a hint: it
/// makes nothing durable and reports no error.
#[pyfunction(name = "start_writeback")]
fn py_start_writeback(py: Python<'_>, fd: i32, offset: u64, length: u64) {
    // (it can block while the device queue is full: not with the GIL held)
    let _ = py.allow_threads(|| start_writeback_fd(fd, offset, length));
}

/// What the hashing code can use on this machine: `sha_ni` (sha2 switches to the SHA
/// extensions at run time when present), `avx2`/`avx512f` (blake3 SIMD), and the number of
/// threads blake3 spreads large inputs over. For benchmark reports and diagnostics.
#[pyfunction]
fn hash_features(py: Python<'_>) -> PyResult<Bound<'_, pyo3::types::PyDict>> {
    let d = pyo3::types::PyDict::new(py);
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        d.set_item("sha_ni", std::is_x86_feature_detected!("sha"))?;
        d.set_item("avx2", std::is_x86_feature_detected!("avx2"))?;
        d.set_item("avx512f", std::is_x86_feature_detected!("avx512f"))?;
    }
    #[cfg(target_arch = "aarch64")]
    {
        d.set_item("sha2_ce", std::arch::is_aarch64_feature_detected!("sha2"))?;
    }
    d.set_item("blake3_threads", rayon::current_num_threads())?;
    d.set_item("read_chunk", READ_CHUNK)?;
    Ok(d)
}

/// Raise InvalidDigestError unless `digest` is `algorithm:hex` of a supported algorithm.
#[pyfunction]
fn validate_digest_str(digest: &str) -> PyResult<(String, String)> {
    validate_digest(digest)
        .map(|(a, h)| (a.name().to_string(), h.to_string()))
        .map_err(InvalidDigestError::new_err)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyHasher>()?;
    m.add_function(wrap_pyfunction!(digest_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(digest_file, m)?)?;
    m.add_function(wrap_pyfunction!(copy_file_hashed, m)?)?;
    m.add_function(wrap_pyfunction!(copy_stream_hashed, m)?)?;
    m.add("DIRECT_MIN", DIRECT_MIN)?;
    m.add_function(wrap_pyfunction!(py_start_writeback, m)?)?;
    m.add_function(wrap_pyfunction!(validate_digest_str, m)?)?;
    m.add_function(wrap_pyfunction!(hash_features, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        let mut h = StreamHasher::new(Algorithm::Sha256);
        h.update(b"abc");
        assert_eq!(
            h.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut h = StreamHasher::new(Algorithm::Blake3);
        h.update(b"");
        assert_eq!(
            h.hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        let mut h = StreamHasher::new(Algorithm::Sha512);
        h.update(b"abc");
        assert!(h.hex().starts_with("ddaf35a193617aba"));
    }

    #[test]
    fn chunking_does_not_matter() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for alg in [Algorithm::Sha256, Algorithm::Sha512, Algorithm::Blake3] {
            let mut whole = StreamHasher::new(alg);
            whole.update(&data);
            let mut parts = StreamHasher::new(alg);
            for c in data.chunks(4097) {
                parts.update(c);
            }
            assert_eq!(whole.hex(), parts.hex());
            let (h, n) = hash_reader(alg, &data[..]).expect("in-memory read");
            assert_eq!((h, n), (whole.hex(), data.len() as u64));
        }
    }

    #[test]
    fn file_paths_and_copy() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("f");
        let data = vec![42u8; 3 << 20];
        std::fs::write(&p, &data)?;
        for alg in [Algorithm::Sha256, Algorithm::Blake3] {
            let (h, n) = hash_path(alg, &p)?;
            assert_eq!(n, data.len() as u64);
            assert_eq!(h, hash_reader(alg, &data[..])?.0);
            let mut out = Vec::new();
            let (h2, _) = copy_hashed(alg, File::open(&p)?, &mut out)?;
            assert_eq!(h2, h);
            assert_eq!(out, data);
        }
        Ok(())
    }

    /// Deterministic bytes that are not a repeating pattern a broken chunking could hide.
    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn copy_path_hashed_matches_serial_hash_and_bytes() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        // Sizes around the buffer and writeback boundaries, and one spanning many buffers.
        let sizes = [
            0,
            1,
            READ_CHUNK - 1,
            READ_CHUNK,
            READ_CHUNK + 1,
            (COPY_BUFFERS + 3) * READ_CHUNK + 17,
            WRITEBACK_EVERY as usize + 4097,
            DIRECT_MIN as usize,                  // direct I/O, whole blocks only
            DIRECT_MIN as usize + READ_CHUNK + 5, // direct I/O, then a buffered tail
        ];
        for (i, &size) in sizes.iter().enumerate() {
            let data = pseudo_random(size, i as u64 + 1);
            let src = dir.path().join(format!("src{i}"));
            std::fs::write(&src, &data)?;
            // Every algorithm and both sync modes on the small sizes; the large ones (slow in
            // debug builds) once, with fsync, as LocalBackend uses it.
            let small = size <= 2 * READ_CHUNK;
            let algs: &[Algorithm] = if small {
                &[Algorithm::Sha256, Algorithm::Sha512, Algorithm::Blake3]
            } else {
                &[Algorithm::Sha256]
            };
            let syncs: &[bool] = if small { &[true, false] } else { &[true] };
            for &alg in algs {
                let dst = dir.path().join(format!("dst{i}-{}", alg.name()));
                for &sync in syncs {
                    let _ = std::fs::remove_file(&dst);
                    let (h, n) = copy_path_hashed(alg, &src, &dst, sync)?;
                    let mut serial = StreamHasher::new(alg);
                    serial.update(&data);
                    assert_eq!((h, n), (serial.hex(), size as u64), "{alg:?} size {size}");
                    assert_eq!(std::fs::read(&dst)?, data, "{alg:?} size {size}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn copy_path_hashed_refuses_existing_dst_and_cleans_up_on_error() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let src = dir.path().join("src");
        std::fs::write(&src, b"content")?;
        let dst = dir.path().join("dst");
        std::fs::write(&dst, b"keep me")?;
        let err = copy_path_hashed(Algorithm::Sha256, &src, &dst, true).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&dst)?, b"keep me");
        // Reading a directory fails after dst was created: dst must not be left behind.
        let dst2 = dir.path().join("dst2");
        assert!(copy_path_hashed(Algorithm::Sha256, dir.path(), &dst2, true).is_err());
        assert!(!dst2.exists());
        let missing = dir.path().join("missing");
        assert_eq!(
            copy_path_hashed(Algorithm::Sha256, &missing, &dst2, true)
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
        assert!(!dst2.exists());
        Ok(())
    }

    #[test]
    fn sink_falls_back_from_direct_io_without_losing_bytes() -> io::Result<()> {
        // /dev/shm is tmpfs, which refuses O_DIRECT; the temp dir usually accepts it.
        let shm = Path::new("/dev/shm");
        let mut dirs = vec![tempfile::tempdir()?];
        if shm.is_dir() {
            dirs.push(tempfile::tempdir_in(shm)?);
        }
        for dir in &dirs {
            let path = dir.path().join("out");
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)?;
            let mut sink = Sink::new(file, true);
            let mut buf = AlignedBuf::new();
            let block = pseudo_random(READ_CHUNK, 3);
            buf.as_mut().copy_from_slice(&block);
            sink.write(buf.get(READ_CHUNK), true)?; // aligned: direct if the filesystem allows
            sink.write(buf.get(1000), true)?; // unaligned tail: buffered
            assert!(!sink.direct);
            sink.write(buf.get(DIRECT_ALIGN), true)?; // after the switch: still buffered, fine
            sink.file.sync_all()?;
            let mut expect = block.clone();
            expect.extend_from_slice(&block[..1000]);
            expect.extend_from_slice(&block[..DIRECT_ALIGN]);
            assert_eq!(std::fs::read(&path)?, expect, "{}", dir.path().display());
        }
        Ok(())
    }

    #[test]
    fn blake3_parallel_update_equals_serial() {
        let data = pseudo_random(3 * BLAKE3_RAYON_CHUNK + 5, 9);
        let mut serial = StreamHasher::new(Algorithm::Blake3);
        serial.update(&data);
        let mut parallel = StreamHasher::new(Algorithm::Blake3);
        for c in data.chunks(BLAKE3_RAYON_CHUNK + 3) {
            parallel.update_parallel(c);
        }
        assert_eq!(serial.hex(), parallel.hex());
    }

    #[test]
    fn parallel_blake3_matches_serial_for_any_read_pattern() -> io::Result<()> {
        /// A reader returning short reads of varying size.
        struct Short<'a>(&'a [u8], usize);
        impl Read for Short<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.1 = (self.1 * 7 + 3) % 100_003 + 1;
                let n = buf.len().min(self.1).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        for size in [
            0,
            1,
            1024,
            1025,
            BLAKE3_READ_CHUNK - 1,
            BLAKE3_READ_CHUNK,
            BLAKE3_READ_CHUNK + 1,
            2 * BLAKE3_READ_CHUNK + 4097,
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let want = blake3::hash(&data).to_hex().to_string();
            assert_eq!(
                blake3_parallel_reader(&data[..])?,
                (want.clone(), size as u64)
            );
            assert_eq!(
                blake3_parallel_reader(Short(&data, 1))?,
                (want, size as u64)
            );
        }
        Ok(())
    }

    #[test]
    fn empty_input_vectors() {
        for (alg, want) in [
            (
                Algorithm::Sha256,
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            ),
            (
                Algorithm::Blake3,
                "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
            ),
        ] {
            assert_eq!(StreamHasher::new(alg).hex(), want);
            assert_eq!(
                hash_reader(alg, &b""[..]).map(|r| r.0).ok().as_deref(),
                Some(want)
            );
        }
        let h = StreamHasher::new(Algorithm::Sha512).hex();
        assert_eq!(h.len(), 128);
        assert!(h.starts_with("cf83e1357eefb8bd"));
    }

    #[test]
    fn digest_grammar_rejects_everything_else() {
        let hex = "a".repeat(64);
        for bad in [
            String::new(),
            "sha256".to_string(),
            "sha256:".to_string(),
            format!(":{hex}"),
            format!("SHA256:{hex}"),
            format!("sha256:{hex}\n"),
            format!("sha256:{hex}\0"),
            format!(" sha256:{hex}"),
            format!("sha256::{}", &hex[1..]),
            format!("sha512:{hex}"),
            format!("blake3:{hex}{hex}"),
            format!("sha256:{}é", &hex[..62]),
            format!("sha256:{}g", &hex[1..]),
            "sha256:../../../../../../../../../../../../../../../../../../../../etc/pw".to_string(),
        ] {
            assert!(validate_digest(&bad).is_err(), "accepted {bad:?}");
        }
        let good = format!("blake3:{hex}");
        let (alg, h) = validate_digest(&good).expect("valid");
        assert_eq!((alg, h), (Algorithm::Blake3, hex.as_str()));
    }

    #[test]
    fn start_writeback_reaches_the_kernel() -> io::Result<()> {
        use std::os::unix::io::AsRawFd;
        let dir = tempfile::tempdir()?;
        let mut f = File::create(dir.path().join("f"))?;
        f.write_all(&[7u8; 100_000])?;
        start_writeback_fd(f.as_raw_fd(), 0, 100_000)?;
        #[cfg(target_os = "linux")]
        {
            let err = start_writeback_fd(-1, 0, 1).expect_err("a bad descriptor");
            assert_eq!(err.raw_os_error(), Some(libc::EBADF));
            let err = start_writeback_fd(f.as_raw_fd(), u64::MAX, 1).expect_err("offset");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
        Ok(())
    }

    #[test]
    fn digest_grammar() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert!(validate_digest(&good).is_ok());
        assert!(validate_digest(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(validate_digest(&format!("sha256:{}", "a".repeat(63))).is_err());
        assert!(validate_digest(&format!("md5:{}", "a".repeat(32))).is_err());
        assert!(validate_digest("sha256:../..").is_err());
        assert!(validate_digest(&format!("sha512:{}", "0".repeat(128))).is_ok());
    }
}
