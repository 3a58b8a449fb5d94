//! The clawstore exception hierarchy raised from Rust, created here so that Rust and Python raise
//! the same classes.
//!
//! Each class is named once, in the `errors!` list below, which both defines it and registers it
//! on the module. `clawstore.errors` re-exports them and defines the errors only the hub raises
//! (PermissionDeniedError, LeaseConflictError) as Python subclasses of `ClawstoreError`.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

macro_rules! errors {
    ($($name:ident($base:ty, $doc:literal);)+) => {
        $(create_exception!(clawstore, $name, $base, $doc);)+

        pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
            let py = m.py();
            $(m.add(stringify!($name), py.get_type::<$name>())?;)+
            Ok(())
        }
    };
}

errors! {
    ClawstoreError(PyException, "Base class of every clawstore error.");
    NotFoundError(ClawstoreError, "Something addressed by digest or name does not exist.");
    BlobNotFoundError(NotFoundError, "No blob with that digest.");
    ManifestNotFoundError(NotFoundError, "No manifest with that digest.");
    RefNotFoundError(NotFoundError, "No such repository:tag.");
    DigestMismatchError(
        ClawstoreError,
        "Bytes do not hash to the digest they were stored or requested under."
    );
    InvalidDigestError(
        ClawstoreError,
        "A digest string that is not algorithm:lowercase-hex of the exact length."
    );
    InvalidNameError(
        ClawstoreError,
        "A repository or tag name outside the OCI distribution grammar."
    );
    InvalidManifestError(
        ClawstoreError,
        "A manifest that is not valid JSON, not of a known schema, too large, or dangling."
    );
    TagConflictError(ClawstoreError, "A tag compare-and-swap whose expectation did not hold.");
    UnsafeArchiveError(
        ClawstoreError,
        "An archive entry that would escape the target or exceed limits."
    );
}
