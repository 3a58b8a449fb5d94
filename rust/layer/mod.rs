//! Volume layers: scan a tree into a file index, pack it (or what changed) into a deterministic
//! tar+zstd layer in one pass with its blob digest and diff_id, and unpack layers safely.
//!
//! - `index`: `scan` a directory, `encode`/`decode` the file index, `diff` two indexes.
//! - `pack`: tar framing + multithreaded zstd with parallel read-ahead and both hashes.
//! - `encoder`: the zstd stream writer with the parameters a layer is compressed with.
//! - `safety`: path cleaning, symlink-safe parents, byte/entry/ratio limits.
//! - `unpack`: OCI whiteouts, type changes, parallel file writes.
//! - `py`: the Python bindings (`Scan`, `Delta`, `PackStream`, `pack_to_file`, `Unpacker`).

mod chunks;
mod encoder;
pub mod fsys;
pub mod index;
pub mod pack;
mod py;
pub mod safety;
pub mod unpack;

pub use py::register;
