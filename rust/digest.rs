//! Streaming content digests: sha256 (default), sha512 and blake3.
//!
//! The pure-Rust half (`Algorithm`, `StreamHasher`, `hash_path`, `copy_hashed`) is used by the
//! other Rust modules and tested by `cargo test`; the `Py*` half exposes it to Python with the
//! GIL released around anything larger than `GIL_RELEASE_THRESHOLD`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use sha2::Digest as _;

use crate::errors::InvalidDigestError;

/// Inputs at least this large are hashed with the GIL released.
pub const GIL_RELEASE_THRESHOLD: usize = 64 * 1024;
/// Read size for streaming files: large enough to amortise syscalls, small enough for L2.
pub const READ_CHUNK: usize = 1 << 20;
/// Above this size blake3 hashes a memory map with all cores (rayon).
const BLAKE3_PARALLEL_MIN: u64 = 1 << 20;
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
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.hex(), total))
}

/// Hash a file by path. blake3 on large files hashes big read buffers with every core.
///
/// Reads, not a memory map: a file truncated by someone else while we hash it must give a
/// wrong digest or an error, never a SIGBUS that kills the whole process.
pub fn hash_path(algorithm: Algorithm, path: &Path) -> io::Result<(String, u64)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
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
    let buf: PyBuffer<u8> = PyBuffer::get(data)?;
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
/// pass; fsyncs `dst`. Returns (hex digest, size).
#[pyfunction]
#[pyo3(signature = (src, dst, algorithm = "sha256"))]
fn copy_file_hashed(
    py: Python<'_>,
    src: std::path::PathBuf,
    dst: std::path::PathBuf,
    algorithm: &str,
) -> PyResult<(String, u64)> {
    let alg = parse_algorithm(algorithm)?;
    py.allow_threads(|| -> io::Result<(String, u64)> {
        let input = File::open(&src)?;
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dst)?;
        let r = copy_hashed(alg, input, &mut out)?;
        out.sync_all()?;
        Ok(r)
    })
    .map_err(|e| io_err(&format!("{} -> {}", src.display(), dst.display()), e))
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
    m.add_function(wrap_pyfunction!(validate_digest_str, m)?)?;
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
