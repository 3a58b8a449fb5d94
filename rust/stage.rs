//! Multipart staging: split a source into parts, hash each part and the whole, hand the parts to
//! Python upload workers with bounded memory.
//!
//! Several worker threads call `PartStager.next_part()` at once. Each call claims the next part
//! number, reads that part (a file is read with `pread` at the part's offset, so workers read in
//! parallel; a stream is read in part order), computes the part's checksum (CRC-32, MD5 or
//! SHA-256, which the server verifies) and then feeds the part to the whole-object hasher
//! in part order. A worker returns only after its part is in the whole digest, so the only part
//! buffers alive are the ones the workers hold: memory is at most `workers x part_size`, and the
//! whole digest is over exactly the bytes handed out for upload.
//!
//! The ordering logic (`Turns`) is pure Rust and tested by `cargo test`; the GIL is released
//! around every read of a file, every wait and all hashing.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard};

use base64::Engine as _;
use md5::{Digest as _, Md5};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::digest::{io_err, parse_algorithm, Algorithm, StreamHasher};

/// S3 limits: parts are 5 MiB..5 GiB (the last may be smaller), at most 10,000 per upload.
pub const MIN_PART_SIZE: u64 = 5 << 20;
pub const MAX_PART_SIZE: u64 = 5 << 30;
pub const MAX_PARTS: u64 = 10_000;

/// Base64 MD5 of a buffer: the `Content-MD5` header value.
pub fn md5_base64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(data))
}

/// Base64 SHA-256 of a buffer: the `x-amz-checksum-sha256` header value.
pub fn sha256_base64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(data))
}

/// Base64 of the big-endian CRC-32 (IEEE, zlib's) of a buffer: the `x-amz-checksum-crc32`
/// header value. `crc32fast` uses PCLMULQDQ where the CPU has it (> 10 GiB/s).
pub fn crc32_base64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(crc32fast::hash(data).to_be_bytes())
}

/// The integrity checksum sent with each part, which the server verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartChecksum {
    /// `Content-MD5`: understood by every S3-compatible server; the part ETag is the same MD5.
    Md5,
    /// `x-amz-checksum-sha256`: about 4x cheaper to compute with SHA extensions.
    Sha256,
    /// `x-amz-checksum-crc32`: what current AWS SDKs send by default; nearly free to compute.
    Crc32,
}

impl PartChecksum {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "md5" => Some(PartChecksum::Md5),
            "sha256" => Some(PartChecksum::Sha256),
            "crc32" => Some(PartChecksum::Crc32),
            _ => None,
        }
    }

    pub fn base64(self, data: &[u8]) -> String {
        match self {
            PartChecksum::Md5 => md5_base64(data),
            PartChecksum::Sha256 => sha256_base64(data),
            PartChecksum::Crc32 => crc32_base64(data),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PartChecksum::Md5 => "md5",
            PartChecksum::Sha256 => "sha256",
            PartChecksum::Crc32 => "crc32",
        }
    }
}

/// A part checksum computed incrementally (`hash_file_parts` reads a part in chunks).
enum PartHasher {
    Md5(Md5),
    Sha256(sha2::Sha256),
    Crc32(crc32fast::Hasher),
}

impl PartHasher {
    fn new(checksum: PartChecksum) -> Self {
        match checksum {
            PartChecksum::Md5 => PartHasher::Md5(Md5::new()),
            PartChecksum::Sha256 => PartHasher::Sha256(sha2::Sha256::new()),
            PartChecksum::Crc32 => PartHasher::Crc32(crc32fast::Hasher::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            PartHasher::Md5(h) => h.update(data),
            PartHasher::Sha256(h) => h.update(data),
            PartHasher::Crc32(h) => h.update(data),
        }
    }

    /// The checksum so far, base64 (as `PartChecksum::base64`), and a fresh hasher for the next part.
    fn take_base64(&mut self, checksum: PartChecksum) -> String {
        let b64 = &base64::engine::general_purpose::STANDARD;
        match std::mem::replace(self, PartHasher::new(checksum)) {
            PartHasher::Md5(h) => b64.encode(h.finalize()),
            PartHasher::Sha256(h) => b64.encode(h.finalize()),
            PartHasher::Crc32(h) => b64.encode(h.finalize().to_be_bytes()),
        }
    }
}

/// Bytes read at a time by `hash_file_parts` (a chunk never spans two parts).
const PARTS_CHUNK: u64 = 8 << 20;

/// The whole-object digest of a file and the checksum of each of its parts, from one read of
/// the file: while the calling thread adds a chunk to the whole digest, a second thread adds it
/// to its part's checksum and a third reads the next chunk, so the pass takes about one hash's
/// time where two cores are free. Returns (hex, size, part checksums in base64); the size is
/// the file's when opened, and a file that shrinks meanwhile is an error.
pub fn hash_file_parts(
    path: &std::path::Path,
    algorithm: Algorithm,
    part_size: u64,
    checksum: PartChecksum,
) -> io::Result<(String, u64, Vec<String>)> {
    if part_size == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "part_size must be > 0",
        ));
    }
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut whole = StreamHasher::new(algorithm);
    let mut part = PartHasher::new(checksum);
    let mut sums = Vec::with_capacity(part_count(size, part_size) as usize);
    // The chunk starting at `pos`: up to PARTS_CHUNK bytes, never past its part's end.
    let chunk_at = |pos: u64| -> (u64, bool) {
        let part_end = size.min((pos / part_size + 1) * part_size);
        let end = part_end.min(pos + PARTS_CHUNK);
        (end - pos, end == part_end)
    };
    let cap = PARTS_CHUNK.min(part_size).min(size.max(1)) as usize;
    let mut cur = vec![0u8; cap];
    let mut next = vec![0u8; cap];
    let mut pos = 0u64;
    let (len, _) = chunk_at(pos);
    read_exact_at(&file, &mut cur[..len as usize], pos)?;
    while pos < size {
        let (len, ends_part) = chunk_at(pos);
        let next_pos = pos + len;
        let data = &cur[..len as usize];
        let read_next = std::thread::scope(|s| -> io::Result<()> {
            let reader = (next_pos < size).then(|| {
                let (n, _) = chunk_at(next_pos);
                let buf = &mut next[..n as usize];
                let file = &file;
                s.spawn(move || read_exact_at(file, buf, next_pos))
            });
            let part = &mut part;
            let sums = &mut sums;
            let parter = s.spawn(move || {
                part.update(data);
                if ends_part {
                    sums.push(part.take_base64(checksum));
                }
            });
            whole.update(data);
            parter
                .join()
                .map_err(|_| io::Error::other("part hasher thread panicked"))?;
            match reader {
                Some(r) => r
                    .join()
                    .map_err(|_| io::Error::other("reader thread panicked"))?,
                None => Ok(()),
            }
        });
        read_next?;
        std::mem::swap(&mut cur, &mut next);
        pos = next_pos;
    }
    if size == 0 {
        sums.push(part.take_base64(checksum)); // one empty part
    }
    Ok((whole.hex(), size, sums))
}

/// Byte range `[start, end)` of part `index` (0-based) of an object of `size` bytes.
pub fn part_range(size: u64, part_size: u64, index: u64) -> Option<(u64, u64)> {
    let start = index.checked_mul(part_size)?;
    if start >= size {
        return None;
    }
    Some((start, size.min(start + part_size)))
}

/// Number of parts of an object of `size` bytes (an empty object is one empty part).
pub fn part_count(size: u64, part_size: u64) -> u64 {
    if size == 0 {
        1
    } else {
        size.div_ceil(part_size)
    }
}

struct TurnState {
    next_claim: u64,
    /// Next part to be read from a stream (files ignore it: they read by offset).
    read_turn: u64,
    /// Next part to enter the whole-object hash.
    hash_turn: u64,
    /// Total parts, once known (from the size, or when a stream reaches its end).
    total: Option<u64>,
    /// `None` while a worker is hashing a part with it.
    hasher: Option<StreamHasher>,
    size: u64,
    failed: Option<String>,
}

/// Hands out part numbers and orders reads (for streams) and whole-object hashing.
pub struct Turns {
    state: Mutex<TurnState>,
    cv: Condvar,
}

/// Why a worker got no part: the source ended, or staging failed (in this or another worker).
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    End,
    Failed(String),
}

impl Turns {
    pub fn new(algorithm: Algorithm, total: Option<u64>) -> Self {
        Turns {
            state: Mutex::new(TurnState {
                next_claim: 0,
                read_turn: 0,
                hash_turn: 0,
                total,
                hasher: Some(StreamHasher::new(algorithm)),
                size: 0,
                failed: None,
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TurnState> {
        // A worker that panicked while holding the lock leaves consistent state (every field is
        // updated atomically under it), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, TurnState>) -> MutexGuard<'a, TurnState> {
        self.cv.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    /// Claim the next part index, or `Stop` when there are no more parts.
    pub fn claim(&self) -> Result<u64, Stop> {
        let mut g = self.lock();
        if let Some(msg) = &g.failed {
            return Err(Stop::Failed(msg.clone()));
        }
        if matches!(g.total, Some(t) if g.next_claim >= t) {
            return Err(Stop::End);
        }
        let idx = g.next_claim;
        g.next_claim += 1;
        Ok(idx)
    }

    /// Block until part `idx` may read from the stream. `Stop::End` if the stream ended before it.
    pub fn wait_read_turn(&self, idx: u64) -> Result<(), Stop> {
        let mut g = self.lock();
        loop {
            if let Some(msg) = &g.failed {
                return Err(Stop::Failed(msg.clone()));
            }
            if matches!(g.total, Some(t) if idx >= t) {
                return Err(Stop::End);
            }
            if g.read_turn == idx {
                return Ok(());
            }
            g = self.wait(g);
        }
    }

    /// Part `idx` finished reading `n` of `part_size` bytes; a short (or empty) part ends the stream.
    pub fn done_reading(&self, idx: u64, n: u64, part_size: u64) {
        let mut g = self.lock();
        g.read_turn = idx + 1;
        if n < part_size {
            // An empty part ends the stream without being a part itself, except for an empty
            // stream, which is a single empty part.
            let total = if n == 0 && idx > 0 { idx } else { idx + 1 };
            g.total = Some(g.total.map_or(total, |t| t.min(total)));
        }
        self.cv.notify_all();
    }

    pub fn fail(&self, msg: String) {
        let mut g = self.lock();
        if g.failed.is_none() {
            g.failed = Some(msg);
        }
        self.cv.notify_all();
    }

    /// Add part `idx` to the whole-object digest once every earlier part is in it. The hasher is
    /// taken out of the lock while hashing, so other workers can claim and wait meanwhile.
    pub fn hash_in_order(&self, idx: u64, data: &[u8]) -> Result<(), Stop> {
        let mut hasher = {
            let mut g = self.lock();
            loop {
                if let Some(msg) = &g.failed {
                    return Err(Stop::Failed(msg.clone()));
                }
                if g.hash_turn == idx {
                    if let Some(h) = g.hasher.take() {
                        break h;
                    }
                }
                g = self.wait(g);
            }
        };
        hasher.update(data);
        let mut g = self.lock();
        g.hasher = Some(hasher);
        g.hash_turn = idx + 1;
        g.size += data.len() as u64;
        self.cv.notify_all();
        Ok(())
    }

    /// Count part `idx` of `len` bytes as done without hashing it (its checksum and the whole
    /// digest were computed beforehand); parts may come in any order.
    pub fn count_unhashed(&self, idx: u64, len: usize) -> Result<(), Stop> {
        let mut g = self.lock();
        if let Some(msg) = &g.failed {
            return Err(Stop::Failed(msg.clone()));
        }
        debug_assert!(idx < g.total.unwrap_or(u64::MAX));
        g.hash_turn += 1;
        g.size += len as u64;
        self.cv.notify_all();
        Ok(())
    }

    /// (hex digest, size, parts) once every part has been hashed; `None` before that.
    pub fn finished(&self) -> Result<Option<(String, u64, u64)>, String> {
        let g = self.lock();
        if let Some(msg) = &g.failed {
            return Err(msg.clone());
        }
        match (g.total, &g.hasher) {
            (Some(t), Some(h)) if g.hash_turn >= t => Ok(Some((h.hex(), g.size, t))),
            _ => Ok(None),
        }
    }
}

/// Read exactly `buf.len()` bytes at `offset` (files do not shrink under us; a short read is an
/// error, so the uploaded object can never silently be truncated).
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset)
}

/// (part index, length, md5 base64) of each staged part.
pub type StagedPart = (u64, usize, String);

/// Pure-Rust staging of a file with `workers` threads: returns the parts' (index, len, md5 base64)
/// in part order and the whole (hex, size). Used by tests and as the reference of the protocol.
pub fn stage_file(
    path: &std::path::Path,
    part_size: u64,
    algorithm: Algorithm,
    workers: usize,
) -> io::Result<(Vec<StagedPart>, String, u64)> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let turns = Turns::new(algorithm, Some(part_count(size, part_size)));
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| loop {
                let idx = match turns.claim() {
                    Ok(i) => i,
                    Err(_) => return,
                };
                let (start, end) = part_range(size, part_size, idx).unwrap_or((0, 0));
                let mut buf = vec![0u8; (end - start) as usize];
                if let Err(e) = read_exact_at(&file, &mut buf, start) {
                    turns.fail(e.to_string());
                    return;
                }
                let md5 = md5_base64(&buf);
                if turns.hash_in_order(idx, &buf).is_err() {
                    return;
                }
                results
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((idx, buf.len(), md5));
            });
        }
    });
    let (hex, total, _) = turns
        .finished()
        .map_err(io::Error::other)?
        .ok_or_else(|| io::Error::other("staging did not finish"))?;
    let mut parts = results.into_inner().unwrap_or_else(|p| p.into_inner());
    parts.sort();
    Ok((parts, hex, total))
}

// ------------------------------------------------------------------------------------------------
// Python binding

enum Source {
    File { file: File, size: u64, name: String },
    Buffer { buf: PyBuffer<u8> },
    Stream { obj: PyObject },
}

/// Splits a file path, a bytes-like object or a binary stream into upload parts.
///
/// `next_part()` is safe to call from many threads at once: it returns
/// `(part_number, data: bytes, content_md5_base64)` with part numbers from 1, or `None` when
/// the source is exhausted. `finish()` returns `(hex digest, size, parts)` of the whole source
/// once every part has been handed out.
#[pyclass(frozen, module = "clawstore._core")]
pub struct PartStager {
    source: Source,
    part_size: u64,
    algorithm: Algorithm,
    checksum: PartChecksum,
    turns: Turns,
    /// (hex, part checksums) from `digest_file_parts` over the same file: nothing is hashed.
    precomputed: Option<(String, Vec<String>)>,
}

/// An uninitialised `bytes` of `len` bytes and its writable storage. The object is not yet
/// shared with any Python code, so filling it before returning is sound (CPython does the same).
fn new_bytes(py: Python<'_>, len: usize) -> PyResult<(Bound<'_, PyBytes>, usize)> {
    // SAFETY: PyBytes_FromStringAndSize(NULL, n) allocates n bytes (+NUL) we then own exclusively.
    unsafe {
        let ptr =
            pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), len as pyo3::ffi::Py_ssize_t);
        let obj = Bound::from_owned_ptr_or_err(py, ptr)?;
        let data = pyo3::ffi::PyBytes_AsString(ptr) as usize;
        Ok((obj.downcast_into_unchecked::<PyBytes>(), data))
    }
}

fn stop_to_result(stop: Stop) -> PyResult<Option<PyObject>> {
    match stop {
        Stop::End => Ok(None),
        Stop::Failed(msg) => Err(PyRuntimeError::new_err(format!(
            "staging failed in another worker: {msg}"
        ))),
    }
}

impl PartStager {
    /// Fill `dst` (len bytes at `ptr`) from the stream, holding the GIL; returns bytes read.
    fn read_stream(py: Python<'_>, obj: &PyObject, ptr: usize, len: usize) -> PyResult<usize> {
        let src = obj.bind(py);
        let readinto = src.getattr("readinto").ok();
        let mut filled = 0usize;
        while filled < len {
            let want = len - filled;
            let n: usize = if let Some(readinto) = &readinto {
                // SAFETY: the memoryview covers our exclusively owned, not yet shared storage and
                // is released (dropped and the buffer's last use) before we return.
                let mv = unsafe {
                    let p = pyo3::ffi::PyMemoryView_FromMemory(
                        (ptr + filled) as *mut std::os::raw::c_char,
                        want as pyo3::ffi::Py_ssize_t,
                        pyo3::ffi::PyBUF_WRITE,
                    );
                    Bound::from_owned_ptr_or_err(py, p)?
                };
                let r = readinto.call1((&mv,));
                let _ = mv.call_method0("release");
                let r = r?;
                if r.is_none() {
                    return Err(PyValueError::new_err(
                        "non-blocking stream returned no data; use a blocking binary stream",
                    ));
                }
                r.extract()?
            } else {
                let chunk = src.call_method1("read", (want,))?;
                let b: Vec<u8> = chunk.extract()?;
                if b.len() > want {
                    return Err(PyValueError::new_err(
                        "stream read() returned more than asked",
                    ));
                }
                // SAFETY: b.len() <= want, within our storage.
                unsafe {
                    std::ptr::copy_nonoverlapping(b.as_ptr(), (ptr + filled) as *mut u8, b.len())
                };
                b.len()
            };
            if n == 0 {
                break;
            }
            if n > want {
                return Err(PyValueError::new_err(
                    "stream readinto() reported more than asked",
                ));
            }
            filled += n;
        }
        Ok(filled)
    }
}

#[pymethods]
impl PartStager {
    #[new]
    #[pyo3(signature = (source, part_size, algorithm = "sha256", checksum = "md5", precomputed = None))]
    fn new(
        source: &Bound<'_, PyAny>,
        part_size: u64,
        algorithm: &str,
        checksum: &str,
        precomputed: Option<(String, u64, Vec<String>)>,
    ) -> PyResult<Self> {
        let alg = parse_algorithm(algorithm)?;
        let part_checksum = PartChecksum::parse(checksum).ok_or_else(|| {
            PyValueError::new_err(format!(
                "part checksum must be 'md5', 'sha256' or 'crc32', not {checksum:?}"
            ))
        })?;
        if part_size == 0 || part_size > MAX_PART_SIZE {
            return Err(PyValueError::new_err(format!(
                "part_size must be 1..={MAX_PART_SIZE} bytes, got {part_size}"
            )));
        }
        let py = source.py();
        let os = py.import("os")?;
        let (src, total) =
            if source.is_instance_of::<pyo3::types::PyString>() || source.hasattr("__fspath__")? {
                let path: PathBuf = os.call_method1("fspath", (source,))?.extract()?;
                let name = path.display().to_string();
                let file = File::open(&path).map_err(|e| io_err(&name, e))?;
                let size = file.metadata().map_err(|e| io_err(&name, e))?.len();
                (
                    Source::File { file, size, name },
                    Some(part_count(size, part_size)),
                )
            } else if let Ok(buf) = PyBuffer::<u8>::get(source) {
                if !buf.is_c_contiguous() {
                    return Err(PyValueError::new_err("buffer must be C-contiguous"));
                }
                let size = buf.len_bytes() as u64;
                (Source::Buffer { buf }, Some(part_count(size, part_size)))
            } else if source.hasattr("readinto")? || source.hasattr("read")? {
                (
                    Source::Stream {
                        obj: source.clone().unbind(),
                    },
                    None,
                )
            } else {
                return Err(PyValueError::new_err(
                    "source must be a path, a bytes-like object or a binary file object",
                ));
            };
        if let Some(t) = total {
            if t > MAX_PARTS {
                return Err(PyValueError::new_err(format!(
                    "{t} parts of {part_size} bytes exceed the S3 limit of {MAX_PARTS}; use larger parts"
                )));
            }
        }
        let precomputed = match precomputed {
            None => None,
            Some((hex, size, sums)) => {
                let Source::File {
                    size: now, name, ..
                } = &src
                else {
                    return Err(PyValueError::new_err(
                        "precomputed checksums need a path source",
                    ));
                };
                if *now != size {
                    return Err(PyValueError::new_err(format!(
                        "{name} changed size since it was hashed ({size} -> {now} bytes)"
                    )));
                }
                if Some(sums.len() as u64) != total {
                    return Err(PyValueError::new_err(format!(
                        "{} precomputed part checksums for {} parts",
                        sums.len(),
                        total.unwrap_or(0)
                    )));
                }
                Some((hex, sums))
            }
        };
        Ok(PartStager {
            source: src,
            part_size,
            algorithm: alg,
            checksum: part_checksum,
            turns: Turns::new(alg, total),
            precomputed,
        })
    }

    /// Size of the source when known up front (paths and buffers), else None.
    #[getter]
    fn size(&self) -> Option<u64> {
        match &self.source {
            Source::File { size, .. } => Some(*size),
            Source::Buffer { buf } => Some(buf.len_bytes() as u64),
            Source::Stream { .. } => None,
        }
    }

    #[getter]
    fn part_size(&self) -> u64 {
        self.part_size
    }

    #[getter]
    fn algorithm(&self) -> &'static str {
        self.algorithm.name()
    }

    /// "md5", "sha256" or "crc32": what the third element of each part is.
    #[getter]
    fn checksum(&self) -> &'static str {
        self.checksum.name()
    }

    /// The next part as `(part_number, data, checksum_base64)`, or None at the end.
    fn next_part(&self, py: Python<'_>) -> PyResult<Option<PyObject>> {
        let idx = match py.allow_threads(|| self.turns.claim()) {
            Ok(i) => i,
            Err(stop) => return stop_to_result(stop),
        };
        let known_size = self.size();
        let len = match known_size {
            Some(size) => {
                part_range(size, self.part_size, idx).map_or(0, |(s, e)| (e - s) as usize)
            }
            None => {
                if idx >= MAX_PARTS {
                    let msg = format!(
                        "stream needs more than {MAX_PARTS} parts of {} bytes; use larger parts",
                        self.part_size
                    );
                    self.turns.fail(msg.clone());
                    return Err(PyValueError::new_err(msg));
                }
                self.part_size as usize
            }
        };
        let (bytes, ptr) = new_bytes(py, len)?;
        let result = self.fill(py, idx, ptr, len);
        let n = match result {
            Ok(Some(n)) => n,
            Ok(None) => return Ok(None),
            Err(e) => {
                self.turns.fail(e.to_string());
                return Err(e);
            }
        };
        // A short stream part: hand out exactly the bytes read (they alone were hashed).
        let bytes = if n < len {
            PyBytes::new(py, &bytes.as_bytes()[..n])
        } else {
            bytes
        };
        if let Some((_, sums)) = &self.precomputed {
            // Hashed beforehand from the same file; the server checks each part against its
            // checksum, which ties the bytes sent to the digest.
            let sum = sums.get(idx as usize).cloned().unwrap_or_default();
            if let Err(stop) = self.turns.count_unhashed(idx, n) {
                return stop_to_result(stop);
            }
            return Ok(Some(
                (idx + 1, bytes, sum).into_pyobject(py)?.into_any().unbind(),
            ));
        }
        let data_ptr = bytes.as_bytes().as_ptr() as usize;
        let md5 = py.allow_threads(|| -> Result<String, Stop> {
            // SAFETY: `bytes` is alive (we hold it) and immutable for the whole call.
            let data = unsafe { std::slice::from_raw_parts(data_ptr as *const u8, n) };
            let sum = self.checksum.base64(data);
            self.turns.hash_in_order(idx, data)?;
            Ok(sum)
        });
        let md5 = match md5 {
            Ok(m) => m,
            Err(stop) => return stop_to_result(stop),
        };
        Ok(Some(
            (idx + 1, bytes, md5).into_pyobject(py)?.into_any().unbind(),
        ))
    }

    /// `(hex digest, size, parts)` of the whole source; RuntimeError before every part was staged.
    fn finish(&self) -> PyResult<(String, u64, u64)> {
        match self.turns.finished() {
            Ok(Some((hex, size, parts))) => match &self.precomputed {
                Some((pre, _)) => Ok((pre.clone(), size, parts)),
                None => Ok((hex, size, parts)),
            },
            Ok(None) => Err(PyRuntimeError::new_err(
                "not every part has been staged yet",
            )),
            Err(msg) => Err(PyRuntimeError::new_err(format!("staging failed: {msg}"))),
        }
    }

    /// Stop staging: workers blocked in or calling `next_part()` get an error.
    fn abort(&self, reason: String) {
        self.turns.fail(reason);
    }
}

impl PartStager {
    /// Read part `idx` into `len` bytes at `ptr`. `Ok(None)`: no such part (stream ended).
    fn fill(&self, py: Python<'_>, idx: u64, ptr: usize, len: usize) -> PyResult<Option<usize>> {
        match &self.source {
            Source::File { file, size, name } => {
                let (start, _) = part_range(*size, self.part_size, idx).unwrap_or((0, 0));
                py.allow_threads(|| {
                    // SAFETY: ptr/len is our exclusively owned, not yet shared bytes storage.
                    let buf = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
                    read_exact_at(file, buf, start)
                })
                .map_err(|e| io_err(&format!("{name}: reading part {}", idx + 1), e))?;
                Ok(Some(len))
            }
            Source::Buffer { buf } => {
                let src = buf.buf_ptr() as usize;
                let total = buf.len_bytes() as u64;
                let (start, _) = part_range(total, self.part_size, idx).unwrap_or((0, 0));
                py.allow_threads(|| {
                    // SAFETY: the source buffer is pinned by `buf`; [start, start+len) is in range.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            (src as *const u8).add(start as usize),
                            ptr as *mut u8,
                            len,
                        )
                    }
                });
                Ok(Some(len))
            }
            Source::Stream { obj } => {
                // Parts past the end of the stream are never hashed: nothing waits for them.
                if let Err(stop) = py.allow_threads(|| self.turns.wait_read_turn(idx)) {
                    return stop_to_result(stop).map(|_| None);
                }
                let n = match Self::read_stream(py, obj, ptr, len) {
                    Ok(n) => n,
                    Err(e) => {
                        self.turns.fail(e.to_string());
                        return Err(e);
                    }
                };
                self.turns.done_reading(idx, n as u64, self.part_size);
                if n == 0 && idx > 0 {
                    return Ok(None);
                }
                Ok(Some(n))
            }
        }
    }
}

/// `(hex digest, size, [part checksum base64])` of the file at `path`, in one read (GIL
/// released): the whole digest and each `part_size` part's checksum, for a `PartStager` given
/// them as `precomputed`.
#[pyfunction]
#[pyo3(signature = (path, algorithm = "sha256", part_size = 8388608, checksum = "sha256"))]
fn digest_file_parts(
    py: Python<'_>,
    path: PathBuf,
    algorithm: &str,
    part_size: u64,
    checksum: &str,
) -> PyResult<(String, u64, Vec<String>)> {
    let alg = parse_algorithm(algorithm)?;
    let part_checksum = PartChecksum::parse(checksum).ok_or_else(|| {
        PyValueError::new_err(format!(
            "part checksum must be 'md5', 'sha256' or 'crc32', not {checksum:?}"
        ))
    })?;
    if part_size == 0 || part_size > MAX_PART_SIZE {
        return Err(PyValueError::new_err(format!(
            "part_size must be 1..={MAX_PART_SIZE} bytes, got {part_size}"
        )));
    }
    let name = path.display().to_string();
    py.allow_threads(|| hash_file_parts(&path, alg, part_size, part_checksum))
        .map_err(|e| io_err(&name, e))
}

/// Base64 MD5 (`Content-MD5`) of a bytes-like object, GIL released for large inputs.
#[pyfunction]
fn content_md5(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<String> {
    crate::digest::with_buffer(py, data, md5_base64)
}

/// Base64 big-endian CRC-32 (`x-amz-checksum-crc32`) of a bytes-like object, GIL released for
/// large inputs.
#[pyfunction]
#[pyo3(name = "crc32_base64")]
fn py_crc32_base64(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<String> {
    crate::digest::with_buffer(py, data, crc32_base64)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PartStager>()?;
    m.add_function(wrap_pyfunction!(content_md5, m)?)?;
    m.add_function(wrap_pyfunction!(digest_file_parts, m)?)?;
    m.add_function(wrap_pyfunction!(py_crc32_base64, m)?)?;
    m.add("MIN_PART_SIZE", MIN_PART_SIZE)?;
    m.add("MAX_PART_SIZE", MAX_PART_SIZE)?;
    m.add("MAX_PARTS", MAX_PARTS)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::hash_reader;

    #[test]
    fn ranges_and_counts() {
        assert_eq!(part_count(0, 10), 1);
        assert_eq!(part_count(10, 10), 1);
        assert_eq!(part_count(11, 10), 2);
        assert_eq!(part_range(25, 10, 2), Some((20, 25)));
        assert_eq!(part_range(25, 10, 3), None);
        assert_eq!(part_range(20, 10, 2), None);
    }

    #[test]
    fn checksum_vectors() {
        // RFC 1321: MD5("abc") = 900150983cd24fb0d6963f7d28e17f72
        assert_eq!(md5_base64(b"abc"), "kAFQmDzST7DWlj99KOF/cg==");
        // FIPS 180-2: SHA-256("abc") = ba7816bf...
        assert_eq!(
            PartChecksum::Sha256.base64(b"abc"),
            "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
        );
        // zlib.crc32(b"abc") == 0x352441c2
        assert_eq!(PartChecksum::Crc32.base64(b"abc"), "NSRBwg==");
        assert_eq!(PartChecksum::parse("crc32"), Some(PartChecksum::Crc32));
        assert_eq!(PartChecksum::parse("crc64"), None);
    }

    #[test]
    fn parallel_file_staging_matches_sequential_hash() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(&p, &data)?;
        for alg in [Algorithm::Sha256, Algorithm::Sha512, Algorithm::Blake3] {
            for (part, workers) in [
                (1u64 << 20, 4usize),
                (999_983, 3),
                (3_000_000, 2),
                (7_000_000, 1),
            ] {
                let (parts, hex, size) = stage_file(&p, part, alg, workers)?;
                assert_eq!(size, data.len() as u64);
                assert_eq!(hex, hash_reader(alg, &data[..])?.0);
                assert_eq!(parts.len() as u64, part_count(size, part));
                for (idx, len, md5) in parts {
                    let (s, e) =
                        part_range(size, part, idx).ok_or_else(|| io::Error::other("range"))?;
                    assert_eq!(len as u64, e - s);
                    assert_eq!(md5, md5_base64(&data[s as usize..e as usize]));
                }
            }
        }
        Ok(())
    }

    #[test]
    fn file_parts_match_whole_and_part_hashes() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..20_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        std::fs::write(&p, &data)?;
        // parts smaller than, equal to and larger than a read chunk; a tail part; one part
        for part in [999_983u64, PARTS_CHUNK, 9 << 20, 20_000_000, 30_000_000] {
            for cs in [PartChecksum::Sha256, PartChecksum::Md5, PartChecksum::Crc32] {
                let (hex, size, sums) = hash_file_parts(&p, Algorithm::Sha256, part, cs)?;
                assert_eq!(size, data.len() as u64);
                assert_eq!(hex, hash_reader(Algorithm::Sha256, &data[..])?.0);
                assert_eq!(sums.len() as u64, part_count(size, part));
                for (i, sum) in sums.iter().enumerate() {
                    let (s, e) = part_range(size, part, i as u64)
                        .ok_or_else(|| io::Error::other("range"))?;
                    assert_eq!(
                        sum,
                        &cs.base64(&data[s as usize..e as usize]),
                        "part {i} of {part}"
                    );
                }
            }
        }
        let e = dir.path().join("empty");
        std::fs::write(&e, b"")?;
        let (hex, size, sums) = hash_file_parts(&e, Algorithm::Sha256, 1 << 20, PartChecksum::Md5)?;
        assert_eq!((size, sums), (0, vec![md5_base64(b"")]));
        assert_eq!(hex, hash_reader(Algorithm::Sha256, &b""[..])?.0);
        Ok(())
    }

    #[test]
    fn empty_file_is_one_empty_part() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("empty");
        std::fs::write(&p, b"")?;
        let (parts, hex, size) = stage_file(&p, 1 << 20, Algorithm::Sha256, 2)?;
        assert_eq!(size, 0);
        assert_eq!(parts.len(), 1);
        assert_eq!(
            hex,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        Ok(())
    }

    #[test]
    fn stream_turns_end_on_short_part() {
        // Simulate 3 workers over a stream of 2.5 parts: parts 0,1 full, part 2 short, part 3 none.
        let t = Turns::new(Algorithm::Sha256, None);
        let data = [7u8; 25];
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| loop {
                    let idx = match t.claim() {
                        Ok(i) => i,
                        Err(_) => return,
                    };
                    if t.wait_read_turn(idx).is_err() {
                        return;
                    }
                    let start = (idx * 10).min(25) as usize;
                    let end = (start + 10).min(25);
                    let n = (end - start) as u64;
                    t.done_reading(idx, n, 10);
                    if n == 0 {
                        return;
                    }
                    if t.hash_in_order(idx, &data[start..end]).is_err() {
                        return;
                    }
                });
            }
        });
        let (hex, size, parts) = t.finished().ok().flatten().unwrap_or_default();
        assert_eq!((size, parts), (25, 3));
        assert_eq!(
            hex,
            hash_reader(Algorithm::Sha256, &data[..])
                .map(|r| r.0)
                .unwrap_or_default()
        );
    }

    #[test]
    fn failure_wakes_waiters() {
        let t = Turns::new(Algorithm::Sha256, Some(3));
        let a = t.claim();
        let b = t.claim();
        assert_eq!((a, b), (Ok(0), Ok(1)));
        std::thread::scope(|s| {
            let h = s.spawn(|| t.hash_in_order(1, b"x"));
            t.fail("disk on fire".into());
            assert_eq!(
                h.join().ok(),
                Some(Err(Stop::Failed("disk on fire".into())))
            );
        });
        assert!(t.finished().is_err());
        assert!(matches!(t.claim(), Err(Stop::Failed(_))));
    }
}
