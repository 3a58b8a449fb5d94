"""Helpers for the hub tests (fixtures are in conftest.py)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import clawstore
import pytest
from clawstore import mediatypes as mt
from clawstore.hub import Principal
from clawstore.manifest import Descriptor, ImageManifest, Index

PG_URL = os.environ.get("CLAWSTORE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
_pg_ok: bool | None = None


def pg_available() -> bool:
    global _pg_ok
    if _pg_ok is None:
        try:
            import psycopg

            with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=3):
                _pg_ok = True
        except Exception:
            _pg_ok = False
    return _pg_ok


CATALOGS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def make_catalog_url(kind: str, tmp_path: Path) -> tuple[str, str | None]:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.sqlite'}", None
    if not pg_available():
        pytest.skip("PostgreSQL on 127.0.0.1:5432 is not reachable")
    return PG_URL, f"clawtest_{uuid.uuid4().hex[:12]}"


ADMIN = Principal.local_admin()


def push_artifact(
    store: clawstore.ArtifactStore,
    repo: str,
    tag: str | None,
    payloads: list[bytes],
    *,
    subject: Descriptor | None = None,
    artifact_type: str = "application/vnd.test.artifact",
) -> Descriptor:
    """Push blobs + an artifact manifest through `store` (a HubSession in most tests)."""
    layers = tuple(store.put_blob(p) for p in payloads)
    cfg = store.put_blob(mt.EMPTY_JSON, media_type=mt.OCI_EMPTY)
    m = ImageManifest(
        Descriptor(cfg.digest, cfg.size, mt.OCI_EMPTY), layers, artifact_type=artifact_type, subject=subject
    )
    d = store.put_manifest(m.to_json())
    if tag is not None:
        store.tag(repo, tag, d.digest)
    return d


def push_index(
    store: clawstore.ArtifactStore, repo: str, tag: str | None, children: list[Descriptor]
) -> Descriptor:
    idx = Index(
        tuple(Descriptor(c.digest, c.size, mt.OCI_MANIFEST) for c in children),
        artifact_type="application/vnd.test.index",
    )
    d = store.put_manifest(idx.to_json())
    if tag is not None:
        store.tag(repo, tag, d.digest)
    return d


def store_objects(store: clawstore.ArtifactStore) -> tuple[set[str], set[str]]:
    return {str(d) for d in store.iter_manifests()}, {str(d) for d in store.iter_blobs()}
