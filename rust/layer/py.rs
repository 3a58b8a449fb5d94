//! Python bindings of the layer module. Heavy work runs with the GIL released; `PackStream`
//! packs on a background thread and is read like a raw binary file, so the store's upload path
//! (`ArtifactStore.put_blob(stream)`) consumes the layer as it is produced, in bounded memory.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::index::{self, Entry, Kind};
use super::pack::{pack, PackError, PackOptions, PackProgress, PackResult};
use super::safety::{Limits, UnpackError};
use super::unpack::{LayerSpec, UnpackStats, Unpacker};
use crate::digest::{io_err, parse_algorithm};
use crate::errors::{DigestMismatchError, UnsafeArchiveError};

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::File => "file",
        Kind::Dir => "dir",
        Kind::Symlink => "symlink",
        Kind::Fifo => "fifo",
        Kind::Char => "char",
        Kind::Block => "block",
    }
}

/// A scanned tree (or a decoded index): sorted entries kept in Rust.
#[pyclass(name = "Scan", module = "clawstore._core", frozen)]
pub struct PyScan {
    root: Option<PathBuf>,
    entries: Arc<Vec<Entry>>,
}

type EntryTuple = (
    String,
    &'static str,
    u64,
    u32,
    i64,
    Option<String>,
    Option<String>,
);

#[pymethods]
impl PyScan {
    #[getter]
    fn root(&self) -> Option<PathBuf> {
        self.root.clone()
    }

    fn __len__(&self) -> usize {
        self.entries.len()
    }

    /// Number of regular files.
    #[getter]
    fn files(&self) -> usize {
        self.entries.iter().filter(|e| e.kind == Kind::File).count()
    }

    /// Bytes of regular files (each hardlinked inode counted once).
    #[getter]
    fn bytes(&self) -> u64 {
        let mut seen = std::collections::HashSet::new();
        self.entries
            .iter()
            .filter(|e| e.kind == Kind::File && (!e.is_hardlinked() || seen.insert((e.dev, e.ino))))
            .map(|e| e.size)
            .sum()
    }

    /// The serialised index (zstd-compressed binary records, version 2).
    fn encode<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let entries = self.entries.clone();
        let data = py
            .allow_threads(move || index::encode(&entries))
            .map_err(|e| io_err("encode index", e))?;
        Ok(PyBytes::new(py, &data))
    }

    /// A digest of the paths and the metadata `diff` compares (and content digests with
    /// `content`): equal fingerprints mean an empty diff.
    #[pyo3(signature = (content = false))]
    fn fingerprint(&self, py: Python<'_>, content: bool) -> String {
        let entries = self.entries.clone();
        py.allow_threads(move || index::fingerprint(&entries, content))
    }

    /// (path, kind, size, mode, mtime_ns, link target, content digest) for every entry.
    fn entries(&self) -> Vec<EntryTuple> {
        self.entries
            .iter()
            .map(|e| {
                (
                    e.path.clone(),
                    kind_name(e.kind),
                    e.size,
                    e.mode,
                    e.mtime_ns,
                    e.link.clone(),
                    e.digest.clone(),
                )
            })
            .collect()
    }

    /// `base`'s entries with each path's filesystem identity (inode, device, ctime, link
    /// count) taken from this scan where the path exists in both: diffing this scan against
    /// the result finds what differs in type, size, mode, owner, mtime, link target or content
    /// only (a fresh checkout or restore has new inodes and ctimes, which do not count).
    fn rebased(&self, py: Python<'_>, base: &PyScan) -> PyScan {
        let now = self.entries.clone();
        let base = base.entries.clone();
        let entries = py.allow_threads(move || {
            let by_path: std::collections::HashMap<&str, &Entry> =
                now.iter().map(|e| (e.path.as_str(), e)).collect();
            base.iter()
                .map(|e| {
                    let mut e = e.clone();
                    if let Some(n) = by_path.get(e.path.as_str()) {
                        e.ino = n.ino;
                        e.dev = n.dev;
                        e.ctime_ns = n.ctime_ns;
                        e.nlink = n.nlink;
                    }
                    e
                })
                .collect::<Vec<Entry>>()
        });
        PyScan {
            root: None,
            entries: Arc::new(entries),
        }
    }

    /// What changed from `old` (another Scan, e.g. a decoded parent index) to this tree.
    #[pyo3(signature = (old, content = false))]
    fn diff(&self, py: Python<'_>, old: &PyScan, content: bool) -> PyDelta {
        let new = self.entries.clone();
        let old = old.entries.clone();
        let d = py.allow_threads(move || index::diff(&old, &new, content));
        let bytes = d.changed_bytes(&self.entries);
        PyDelta {
            changed_bytes: bytes,
            inner: d,
            new: self.entries.clone(),
        }
    }
}

/// The difference between two indexes: what an incremental layer packs.
#[pyclass(name = "Delta", module = "clawstore._core", frozen)]
pub struct PyDelta {
    inner: index::Delta,
    new: Arc<Vec<Entry>>,
    changed_bytes: u64,
}

#[pymethods]
impl PyDelta {
    #[getter]
    fn changed(&self) -> usize {
        self.inner.changed.len()
    }

    #[getter]
    fn changed_bytes(&self) -> u64 {
        self.changed_bytes
    }

    #[getter]
    fn changed_paths(&self) -> Vec<String> {
        self.inner
            .changed
            .iter()
            .map(|&i| self.new[i].path.clone())
            .collect()
    }

    #[getter]
    fn whiteouts(&self) -> Vec<String> {
        self.inner.whiteouts.clone()
    }

    #[getter]
    fn opaque(&self) -> Vec<String> {
        self.inner.opaque.clone()
    }

    fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

/// Scan `root` (symlinks never followed); with `content_digests`, hash every regular file too.
#[pyfunction]
#[pyo3(signature = (root, content_digests = false, algorithm = "sha256"))]
fn scan_tree(
    py: Python<'_>,
    root: PathBuf,
    content_digests: bool,
    algorithm: &str,
) -> PyResult<PyScan> {
    let alg = parse_algorithm(algorithm)?;
    let r = root.clone();
    let entries = py
        .allow_threads(move || index::scan(&r, content_digests.then_some(alg)))
        .map_err(|e| match e {
            index::ScanError::Io(p, err) => io_err(&p.display().to_string(), err),
            other => PyValueError::new_err(other.to_string()),
        })?;
    Ok(PyScan {
        root: Some(root),
        entries: Arc::new(entries),
    })
}

/// Decode a serialised index into a Scan without a root.
#[pyfunction]
fn decode_index(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<PyScan> {
    let buf: PyBuffer<u8> = PyBuffer::get(data)?;
    let bytes = buf.to_vec(py)?;
    let entries = py
        .allow_threads(move || index::decode(&bytes))
        .map_err(|e| crate::errors::InvalidManifestError::new_err(format!("volume index: {e}")))?;
    Ok(PyScan {
        root: None,
        entries: Arc::new(entries),
    })
}

fn options(level: i32, threads: u32, readers: usize, algorithm: &str) -> PyResult<PackOptions> {
    let mut o = PackOptions::default();
    if !(1..=22).contains(&level) {
        return Err(PyValueError::new_err(format!(
            "zstd level {level} outside 1..=22"
        )));
    }
    o.level = level;
    if threads > 0 {
        o.threads = threads;
    }
    if readers > 0 {
        o.readers = readers;
    }
    o.algorithm = parse_algorithm(algorithm)?;
    Ok(o)
}

struct Selection {
    root: PathBuf,
    entries: Arc<Vec<Entry>>,
    indices: Option<Vec<usize>>,
    whiteouts: Vec<String>,
    opaque: Vec<String>,
}

impl Selection {
    fn new(scan: &PyScan, delta: Option<&PyDelta>) -> PyResult<Self> {
        let root = scan
            .root
            .clone()
            .ok_or_else(|| PyValueError::new_err("cannot pack a decoded index: it has no root"))?;
        if let Some(d) = delta {
            if !Arc::ptr_eq(&d.new, &scan.entries) {
                return Err(PyValueError::new_err(
                    "delta was computed against another scan",
                ));
            }
        }
        Ok(Selection {
            root,
            entries: scan.entries.clone(),
            indices: delta.map(|d| d.inner.changed.clone()),
            whiteouts: delta.map(|d| d.inner.whiteouts.clone()).unwrap_or_default(),
            opaque: delta.map(|d| d.inner.opaque.clone()).unwrap_or_default(),
        })
    }

    fn run<W: Write + Send>(
        &self,
        out: W,
        opts: &PackOptions,
        progress: &PackProgress,
    ) -> Result<(PackResult, W), PackError> {
        let refs: Vec<&Entry> = match &self.indices {
            Some(ix) => ix.iter().map(|&i| &self.entries[i]).collect(),
            None => self.entries.iter().collect(),
        };
        pack(
            &self.root,
            &refs,
            &self.whiteouts,
            &self.opaque,
            out,
            opts,
            progress,
        )
    }
}

fn result_dict<'py>(py: Python<'py>, r: &PackResult) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("digest", &r.digest)?;
    d.set_item("diff_id", &r.diff_id)?;
    d.set_item("size", r.size)?;
    d.set_item("uncompressed_size", r.uncompressed_size)?;
    d.set_item("entries", r.entries)?;
    d.set_item("files", r.files)?;
    d.set_item("file_bytes", r.file_bytes)?;
    Ok(d)
}

fn pack_err(e: PackError) -> PyErr {
    io_err(&e.0, e.1)
}

/// Pack a scan (or the delta of it) into a new file at `path`. Returns the result dict.
#[pyfunction]
#[pyo3(signature = (scan, path, delta = None, level = 3, threads = 0, readers = 0, algorithm = "sha256"))]
#[allow(clippy::too_many_arguments)]
fn pack_to_file<'py>(
    py: Python<'py>,
    scan: &PyScan,
    path: PathBuf,
    delta: Option<&PyDelta>,
    level: i32,
    threads: u32,
    readers: usize,
    algorithm: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = options(level, threads, readers, algorithm)?;
    let sel = Selection::new(scan, delta)?;
    let r = py.allow_threads(move || -> Result<PackResult, PackError> {
        let f = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| PackError(path.display().to_string(), e))?;
        let w = io::BufWriter::with_capacity(1 << 20, f);
        let (r, w) = sel.run(w, &opts, &PackProgress::default())?;
        w.into_inner()
            .map_err(|e| PackError(path.display().to_string(), e.into_error()))?;
        Ok(r)
    });
    result_dict(py, &r.map_err(pack_err)?)
}

/// Sends output in ~1 MiB chunks over a bounded channel (memory: capacity x chunk).
struct ChannelWriter {
    tx: Sender<Vec<u8>>,
    buf: Vec<u8>,
}

const CHUNK: usize = 1 << 20;
const CHANNEL_CHUNKS: usize = 8;

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK + (64 << 10)));
        self.tx
            .send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "layer reader closed"))
    }
}

type Outcome = Arc<Mutex<Option<Result<PackResult, PackError>>>>;

/// A layer being packed on a background thread, read like a raw binary file (`readinto`).
/// After EOF, `result()` gives the digest, diff_id and sizes.
#[pyclass(name = "PackStream", module = "clawstore._core")]
pub struct PyPackStream {
    rx: Option<Receiver<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
    progress: Arc<PackProgress>,
    outcome: Outcome,
    handle: Option<JoinHandle<()>>,
    consumed: u64,
    eof: bool,
}

impl PyPackStream {
    fn join(&mut self) {
        self.rx = None; // unblocks a writer still sending
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }

    fn next_chunk(&mut self, py: Python<'_>) -> bool {
        let Some(rx) = self.rx.clone() else {
            return false;
        };
        match py.allow_threads(move || rx.recv()) {
            Ok(c) => {
                self.chunk = c;
                self.pos = 0;
                true
            }
            Err(_) => false,
        }
    }

    fn finished_error(&mut self, py: Python<'_>) -> PyResult<()> {
        self.eof = true;
        py.allow_threads(|| self.join());
        match self.outcome.lock() {
            Ok(g) => match &*g {
                Some(Err(e)) => Err(PyOSError::new_err((
                    e.1.raw_os_error().unwrap_or(0),
                    e.to_string(),
                ))),
                _ => Ok(()),
            },
            Err(_) => Err(PyOSError::new_err("pack thread panicked")),
        }
    }
}

#[pymethods]
impl PyPackStream {
    #[new]
    #[pyo3(signature = (scan, delta = None, level = 3, threads = 0, readers = 0, algorithm = "sha256"))]
    fn new(
        scan: &PyScan,
        delta: Option<&PyDelta>,
        level: i32,
        threads: u32,
        readers: usize,
        algorithm: &str,
    ) -> PyResult<Self> {
        let opts = options(level, threads, readers, algorithm)?;
        let sel = Selection::new(scan, delta)?;
        let (tx, rx) = bounded::<Vec<u8>>(CHANNEL_CHUNKS);
        let progress = Arc::new(PackProgress::default());
        let outcome: Outcome = Arc::new(Mutex::new(None));
        let (p, o) = (progress.clone(), outcome.clone());
        let handle = std::thread::Builder::new()
            .name("clawstore-pack".into())
            .spawn(move || {
                let w = ChannelWriter {
                    tx,
                    buf: Vec::with_capacity(CHUNK + (64 << 10)),
                };
                let r = sel.run(w, &opts, &p).map(|(r, _w)| r);
                if let Ok(mut g) = o.lock() {
                    *g = Some(r);
                }
            })
            .map_err(|e| io_err("spawn pack thread", e))?;
        Ok(PyPackStream {
            rx: Some(rx),
            chunk: Vec::new(),
            pos: 0,
            progress,
            outcome,
            handle: Some(handle),
            consumed: 0,
            eof: false,
        })
    }

    fn readable(&self) -> bool {
        true
    }

    /// Fill `buffer` with the next bytes of the layer; 0 at the end. Raises OSError if packing
    /// failed (so a consumer never stores a truncated layer as complete).
    fn readinto(&mut self, py: Python<'_>, buffer: &Bound<'_, PyAny>) -> PyResult<usize> {
        let buf: PyBuffer<u8> = PyBuffer::get(buffer)?;
        if buf.readonly() || !buf.is_c_contiguous() {
            return Err(PyValueError::new_err(
                "readinto needs a writable contiguous buffer",
            ));
        }
        let cap = buf.len_bytes();
        let mut filled = 0usize;
        while filled < cap {
            if self.pos >= self.chunk.len() {
                if filled > 0 {
                    break;
                }
                if !self.next_chunk(py) {
                    self.finished_error(py)?;
                    return Ok(0);
                }
                continue;
            }
            let n = (cap - filled).min(self.chunk.len() - self.pos);
            // SAFETY: buf is a writable C-contiguous buffer of `cap` bytes held by `buf`.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.chunk.as_ptr().add(self.pos),
                    (buf.buf_ptr() as *mut u8).add(filled),
                    n,
                );
            }
            self.pos += n;
            filled += n;
        }
        self.consumed += filled as u64;
        Ok(filled)
    }

    /// Read up to `size` bytes (all that is left when negative).
    #[pyo3(signature = (size = -1))]
    fn read<'py>(&mut self, py: Python<'py>, size: i64) -> PyResult<Bound<'py, PyBytes>> {
        let mut out = Vec::new();
        loop {
            if size >= 0 && out.len() as i64 >= size {
                break;
            }
            if self.pos >= self.chunk.len() {
                if !self.next_chunk(py) {
                    self.finished_error(py)?;
                    break;
                }
                continue;
            }
            let want = if size < 0 {
                self.chunk.len() - self.pos
            } else {
                ((size as usize) - out.len()).min(self.chunk.len() - self.pos)
            };
            out.extend_from_slice(&self.chunk[self.pos..self.pos + want]);
            self.pos += want;
            if size >= 0 {
                continue;
            }
        }
        self.consumed += out.len() as u64;
        Ok(PyBytes::new(py, &out))
    }

    /// (entries, files, file bytes) packed so far.
    #[getter]
    fn progress(&self) -> (u64, u64, u64) {
        (
            self.progress.entries.load(Ordering::Relaxed),
            self.progress.files.load(Ordering::Relaxed),
            self.progress.bytes.load(Ordering::Relaxed),
        )
    }

    /// Result dict after the stream was read to the end; raises the packing error if any.
    fn result<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        if !self.eof {
            return Err(PyValueError::new_err("layer stream not read to the end"));
        }
        py.allow_threads(|| self.join());
        let g = self
            .outcome
            .lock()
            .map_err(|_| PyOSError::new_err("pack thread panicked"))?;
        match &*g {
            Some(Ok(r)) => {
                if r.size != self.consumed {
                    return Err(PyOSError::new_err(format!(
                        "layer stream delivered {} of {} bytes",
                        self.consumed, r.size
                    )));
                }
                result_dict(py, r)
            }
            Some(Err(e)) => Err(PyOSError::new_err((
                e.1.raw_os_error().unwrap_or(0),
                e.to_string(),
            ))),
            None => Err(PyOSError::new_err("pack thread ended without a result")),
        }
    }

    fn close(&mut self, py: Python<'_>) {
        py.allow_threads(|| self.join());
    }

    #[getter]
    fn closed(&self) -> bool {
        self.rx.is_none()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(&mut self, py: Python<'_>, _a: PyObject, _b: PyObject, _c: PyObject) {
        self.close(py);
    }
}

/// Reads a Python binary file object (e.g. the store's verifying reader) from Rust, taking the
/// GIL per chunk; keeps the first Python exception to re-raise it unchanged.
struct PyReader {
    obj: Py<PyAny>,
    err: Arc<Mutex<Option<PyErr>>>,
}

impl Read for PyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Python::with_gil(|py| {
            // bytes via the buffer (PyBackedBytes): extracting Vec<u8> would convert element by
            // element (~25 ns a byte, the bottleneck of every restore from a Python reader).
            let r = self
                .obj
                .bind(py)
                .call_method1("read", (buf.len(),))
                .and_then(|b| b.extract::<pyo3::pybacked::PyBackedBytes>());
            match r {
                Ok(data) => {
                    if data.len() > buf.len() {
                        return Err(io::Error::other("reader returned more than asked"));
                    }
                    buf[..data.len()].copy_from_slice(&data);
                    Ok(data.len())
                }
                Err(e) => {
                    let msg = e.to_string();
                    if let Ok(mut g) = self.err.lock() {
                        g.get_or_insert(e);
                    }
                    Err(io::Error::other(msg))
                }
            }
        })
    }
}

fn unpack_err(e: UnpackError, pyerr: &Arc<Mutex<Option<PyErr>>>) -> PyErr {
    if let Some(p) = pyerr.lock().ok().and_then(|mut g| g.take()) {
        return p;
    }
    match e {
        UnpackError::Unsafe(m) => UnsafeArchiveError::new_err(m),
        UnpackError::Digest(m) => DigestMismatchError::new_err(m),
        UnpackError::Io(c, err) => io_err(&c, err),
    }
}

fn stats_dict<'py>(py: Python<'py>, s: &UnpackStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("layers", s.layers)?;
    d.set_item("entries", s.entries)?;
    d.set_item("files", s.files)?;
    d.set_item("file_bytes", s.file_bytes)?;
    d.set_item("bytes", s.bytes)?;
    Ok(d)
}

/// Applies layers in order to a target directory; `finish()` sets directory metadata.
#[pyclass(name = "Unpacker", module = "clawstore._core")]
pub struct PyUnpacker {
    inner: Option<Unpacker>,
}

#[pymethods]
impl PyUnpacker {
    #[new]
    #[pyo3(signature = (dest, *, max_bytes = None, max_entries = None, max_ratio = None,
                        allow_devices = false, same_owner = None, workers = 0))]
    fn new(
        dest: &Bound<'_, PyAny>,
        max_bytes: Option<u64>,
        max_entries: Option<u64>,
        max_ratio: Option<u64>,
        allow_devices: bool,
        same_owner: Option<bool>,
        workers: usize,
    ) -> PyResult<Self> {
        let mut limits = Limits::default();
        if let Some(v) = max_bytes {
            limits.max_bytes = v;
        }
        if let Some(v) = max_entries {
            limits.max_entries = v;
        }
        if let Some(v) = max_ratio {
            limits.max_ratio = v;
        }
        limits.allow_devices = allow_devices;
        // SAFETY: geteuid has no preconditions.
        limits.same_owner = same_owner.unwrap_or_else(|| unsafe { libc::geteuid() } == 0);
        let workers = if workers == 0 {
            std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .clamp(2, 8)
        } else {
            workers
        };
        let none = Arc::new(Mutex::new(None));
        let u = if let Ok(fd) = dest.extract::<i32>() {
            // A directory descriptor the caller opened (O_DIRECTORY|O_NOFOLLOW, relative to a
            // parent it holds): we keep our own duplicate and never resolve a path again.
            if fd < 0 {
                return Err(PyValueError::new_err("dest: negative file descriptor"));
            }
            // SAFETY: the caller passes an open descriptor it keeps open during this call; we
            // only duplicate it.
            let owned = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
                .try_clone_to_owned()
                .map_err(|e| io_err("dest", e))?;
            let shown = std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .unwrap_or_else(|_| PathBuf::from(format!("<fd {fd}>")));
            Unpacker::from_dir(File::from(owned), shown, limits, workers)
        } else {
            let dest: PathBuf = dest.extract()?;
            Unpacker::new(&dest, limits, workers)
        }
        .map_err(|e| unpack_err(e, &none))?;
        Ok(PyUnpacker { inner: Some(u) })
    }

    /// Apply one layer from a path or a binary file object; verifies `digest` (of the compressed
    /// bytes), `diff_id` and `size` (uncompressed) when given. `progress(files, tar_bytes)` is called
    /// now and then.
    #[pyo3(signature = (source, *, digest = None, diff_id = None, size = None, progress = None))]
    fn apply<'py>(
        &mut self,
        py: Python<'py>,
        source: &Bound<'py, PyAny>,
        digest: Option<String>,
        diff_id: Option<String>,
        size: Option<u64>,
        progress: Option<PyObject>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let mut u = self
            .inner
            .take()
            .ok_or_else(|| PyValueError::new_err("unpacker already finished or failed"))?;
        let spec = LayerSpec {
            digest,
            diff_id,
            uncompressed_size: size,
        };
        let pyerr: Arc<Mutex<Option<PyErr>>> = Arc::new(Mutex::new(None));
        enum Src {
            Path(PathBuf),
            Obj(PyReader),
        }
        let src = match source.extract::<PathBuf>() {
            Ok(p) => Src::Path(p),
            Err(_) => Src::Obj(PyReader {
                obj: source.clone().unbind(),
                err: pyerr.clone(),
            }),
        };
        let perr = pyerr.clone();
        let mut cb = move |s: &UnpackStats| -> Result<(), UnpackError> {
            if let Some(cb) = &progress {
                Python::with_gil(|py| cb.call1(py, (s.files, s.bytes)).map(|_| ())).map_err(
                    |e| {
                        let msg = e.to_string();
                        if let Ok(mut g) = perr.lock() {
                            g.get_or_insert(e);
                        }
                        UnpackError::Io("progress callback".into(), io::Error::other(msg))
                    },
                )?;
            }
            Ok(())
        };
        let (u, r) = py.allow_threads(move || {
            let r = match src {
                Src::Path(p) => match File::open(&p) {
                    Ok(f) => u.apply(f, &spec, &mut cb),
                    Err(e) => Err(UnpackError::Io(p.display().to_string(), e)),
                },
                Src::Obj(r) => u.apply(r, &spec, &mut cb),
            };
            (u, r)
        });
        // A failed layer leaves the target in an unknown state: the unpacker is done.
        let stats = r.map_err(|e| unpack_err(e, &pyerr))?;
        self.inner = Some(u);
        let d = PyDict::new(py);
        d.set_item("digest", stats.digest)?;
        d.set_item("diff_id", stats.diff_id)?;
        d.set_item("compressed", stats.compressed)?;
        d.set_item("uncompressed", stats.uncompressed)?;
        d.set_item("entries", stats.entries)?;
        Ok(d)
    }

    /// Wait for all writes and set directory metadata; returns totals.
    fn finish<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let u = self
            .inner
            .take()
            .ok_or_else(|| PyValueError::new_err("unpacker already finished or failed"))?;
        let none = Arc::new(Mutex::new(None));
        let s = py
            .allow_threads(move || u.finish())
            .map_err(|e| unpack_err(e, &none))?;
        stats_dict(py, &s)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyScan>()?;
    m.add_class::<PyDelta>()?;
    m.add_class::<PyPackStream>()?;
    m.add_class::<PyUnpacker>()?;
    m.add_function(wrap_pyfunction!(scan_tree, m)?)?;
    m.add_function(wrap_pyfunction!(decode_index, m)?)?;
    m.add_function(wrap_pyfunction!(pack_to_file, m)?)?;
    Ok(())
}
