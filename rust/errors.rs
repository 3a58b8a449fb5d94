//! The clawstore exception hierarchy, created here so that Rust and Python raise the same classes.
//!
//! `clawstore.errors` re-exports every class; Python code never defines its own duplicates.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    clawstore,
    ClawstoreError,
    PyException,
    "Base class of every clawstore error."
);
create_exception!(
    clawstore,
    NotFoundError,
    ClawstoreError,
    "Something addressed by digest or name does not exist."
);
create_exception!(
    clawstore,
    BlobNotFoundError,
    NotFoundError,
    "No blob with that digest."
);
create_exception!(
    clawstore,
    ManifestNotFoundError,
    NotFoundError,
    "No manifest with that digest."
);
create_exception!(
    clawstore,
    RefNotFoundError,
    NotFoundError,
    "No such repository:tag."
);
create_exception!(
    clawstore,
    DigestMismatchError,
    ClawstoreError,
    "Bytes do not hash to the digest they were stored or requested under."
);
create_exception!(
    clawstore,
    InvalidDigestError,
    ClawstoreError,
    "A digest string that is not algorithm:lowercase-hex of the exact length."
);
create_exception!(
    clawstore,
    InvalidNameError,
    ClawstoreError,
    "A repository or tag name outside the OCI distribution grammar."
);
create_exception!(
    clawstore,
    InvalidManifestError,
    ClawstoreError,
    "A manifest that is not valid JSON, not of a known schema, too large, or dangling."
);
create_exception!(
    clawstore,
    TagConflictError,
    ClawstoreError,
    "A tag compare-and-swap whose expectation did not hold."
);
create_exception!(
    clawstore,
    UnsafeArchiveError,
    ClawstoreError,
    "An archive entry that would escape the target or exceed limits."
);
create_exception!(
    clawstore,
    PermissionDeniedError,
    ClawstoreError,
    "The principal lacks the grant for this action."
);
create_exception!(
    clawstore,
    LeaseConflictError,
    ClawstoreError,
    "A lease is held by someone else."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("ClawstoreError", py.get_type::<ClawstoreError>())?;
    m.add("NotFoundError", py.get_type::<NotFoundError>())?;
    m.add("BlobNotFoundError", py.get_type::<BlobNotFoundError>())?;
    m.add(
        "ManifestNotFoundError",
        py.get_type::<ManifestNotFoundError>(),
    )?;
    m.add("RefNotFoundError", py.get_type::<RefNotFoundError>())?;
    m.add("DigestMismatchError", py.get_type::<DigestMismatchError>())?;
    m.add("InvalidDigestError", py.get_type::<InvalidDigestError>())?;
    m.add("InvalidNameError", py.get_type::<InvalidNameError>())?;
    m.add(
        "InvalidManifestError",
        py.get_type::<InvalidManifestError>(),
    )?;
    m.add("TagConflictError", py.get_type::<TagConflictError>())?;
    m.add("UnsafeArchiveError", py.get_type::<UnsafeArchiveError>())?;
    m.add(
        "PermissionDeniedError",
        py.get_type::<PermissionDeniedError>(),
    )?;
    m.add("LeaseConflictError", py.get_type::<LeaseConflictError>())?;
    Ok(())
}
