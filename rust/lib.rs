//! `clawstore._core`: the byte-heavy half of clawstore.
//!
//! Modules: `errors` (the Python exception hierarchy), `digest` (streaming sha256/sha512/blake3),
//! `stage` (multipart part staging for the S3 backend),
//! `layer` (volume layers: scan/index, tar+zstd pack, safe unpack),
//! `checkpoint` (framed checkpoint packs read one file at a time).
//! Each module has a pure-Rust API tested by `cargo test` and a `register` that exposes it.

use pyo3::prelude::*;

pub mod checkpoint;
pub mod digest;
pub mod errors;
pub mod layer;
pub mod stage;

#[pymodule(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    digest::register(m)?;
    stage::register(m)?;
    layer::register(m)?;
    checkpoint::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
