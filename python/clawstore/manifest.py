"""Typed OCI v1.1 descriptors, image manifests and indexes; parsing, validation, canonical JSON.

Pure data: nothing here touches storage. `parse_manifest` is what `ArtifactStore.put_manifest`
runs on every manifest before it is stored; `references` lists what a manifest points at, so the
store can refuse dangling manifests and the hub can record edges for GC.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from clawstore import mediatypes as mt
from clawstore.digest import Digest, digest_bytes
from clawstore.errors import InvalidDigestError, InvalidManifestError

MAX_MANIFEST_SIZE: Final = 4 * 1024 * 1024


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no insignificant whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _annotations(value: object, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidManifestError(f"{where}.annotations must map strings to strings")
    return dict(value)


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI content descriptor: what, how big, and its digest."""

    digest: Digest
    size: int
    media_type: str = mt.OCTET_STREAM
    artifact_type: str | None = None
    annotations: Mapping[str, str] | None = None
    urls: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.artifact_type is not None:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.urls:
            out["urls"] = list(self.urls)
        return out

    @classmethod
    def from_dict(cls, obj: object, where: str = "descriptor") -> Descriptor:
        if not isinstance(obj, dict):
            raise InvalidManifestError(f"{where} must be an object")
        media_type = obj.get("mediaType")
        if not mt.is_valid_media_type(media_type):
            raise InvalidManifestError(f"{where}.mediaType {media_type!r} is not a valid media type")
        try:
            digest = Digest.parse(obj.get("digest"))  # type: ignore[arg-type]
        except InvalidDigestError as e:
            raise InvalidManifestError(f"{where}.digest: {e}") from None
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidManifestError(f"{where}.size must be a non-negative integer")
        artifact_type = obj.get("artifactType")
        if artifact_type is not None and not mt.is_valid_media_type(artifact_type):
            raise InvalidManifestError(f"{where}.artifactType {artifact_type!r} is not a valid media type")
        data = obj.get("data")
        if data is not None:
            # OCI 1.1 embedded content: it must be base64 of exactly the described bytes.
            try:
                raw = base64.b64decode(data, validate=True) if isinstance(data, str) else None
            except ValueError:
                raw = None
            if raw is None or len(raw) != size or digest_bytes(raw, digest.algorithm) != digest:
                raise InvalidManifestError(f"{where}.data is not base64 of the described content")
        urls = obj.get("urls")
        if urls is not None and (not isinstance(urls, list) or not all(isinstance(u, str) for u in urls)):
            raise InvalidManifestError(f"{where}.urls must be a list of strings")
        return cls(
            digest=digest,
            size=size,
            media_type=media_type,  # type: ignore[arg-type]
            artifact_type=artifact_type,
            annotations=_annotations(obj.get("annotations"), where),
            urls=tuple(urls) if urls else None,
        )

    @classmethod
    def for_bytes(cls, data: bytes, media_type: str, **kw: Any) -> Descriptor:
        return cls(digest=digest_bytes(data), size=len(data), media_type=media_type, **kw)


EMPTY_CONFIG: Final = Descriptor(Digest(mt.EMPTY_DIGEST), 2, mt.OCI_EMPTY)


def _with_optional(
    out: dict[str, Any],
    artifact_type: str | None,
    subject: Descriptor | None,
    annotations: Mapping[str, str] | None,
) -> dict[str, Any]:
    """The OCI v1.1 fields image manifests and indexes share, set only when present."""
    if artifact_type is not None:
        out["artifactType"] = artifact_type
    if subject is not None:
        out["subject"] = subject.to_dict()
    if annotations:
        out["annotations"] = dict(annotations)
    return out


@dataclass(frozen=True, slots=True)
class ImageManifest:
    """OCI image manifest v1.1 (with artifactType and subject)."""

    config: Descriptor
    layers: tuple[Descriptor, ...] = ()
    artifact_type: str | None = None
    subject: Descriptor | None = None
    annotations: Mapping[str, str] | None = None
    #: OCI image manifest, or Docker v2 schema 2 (same shape)
    media_type: str = mt.OCI_MANIFEST
    kind: Literal["manifest"] = field(default="manifest", init=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "config": self.config.to_dict(),
            "layers": [d.to_dict() for d in self.layers],
        }
        return _with_optional(out, self.artifact_type, self.subject, self.annotations)

    def to_json(self) -> bytes:
        return canonical_json(self.to_dict())

    def blobs(self) -> Iterator[Descriptor]:
        yield self.config
        yield from self.layers


@dataclass(frozen=True, slots=True)
class Index:
    """OCI image index: a list of manifests (multi-part artifacts, multi-arch images)."""

    manifests: tuple[Descriptor, ...] = ()
    artifact_type: str | None = None
    subject: Descriptor | None = None
    annotations: Mapping[str, str] | None = None
    #: OCI image index, or Docker manifest list (same shape)
    media_type: str = mt.OCI_INDEX
    kind: Literal["index"] = field(default="index", init=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "manifests": [d.to_dict() for d in self.manifests],
        }
        return _with_optional(out, self.artifact_type, self.subject, self.annotations)

    def to_json(self) -> bytes:
        return canonical_json(self.to_dict())

    def blobs(self) -> Iterator[Descriptor]:
        return iter(())


Manifest = ImageManifest | Index


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_manifest(data: bytes, media_type: str | None = None) -> Manifest:
    """Validate and type a manifest. InvalidManifestError for anything not a valid OCI manifest or
    index, over 4 MiB, or whose `mediaType` disagrees with `media_type`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidManifestError("manifest must be bytes")
    if len(data) > MAX_MANIFEST_SIZE:
        raise InvalidManifestError(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_SIZE} byte limit")
    try:
        # Strict: UTF-8 only (no BOM, no UTF-16/32 sniffing), no NaN/Infinity, no duplicate keys
        # (two parsers must never disagree about what a stored manifest says).
        obj = json.loads(
            bytes(data).decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant
        )
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidManifestError(f"manifest is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidManifestError("manifest JSON is nested too deeply") from None
    if not isinstance(obj, dict):
        raise InvalidManifestError("manifest must be a JSON object")
    version = obj.get("schemaVersion")
    if type(version) is not int or version != 2:
        raise InvalidManifestError("manifest schemaVersion must be 2")
    declared = obj.get("mediaType")
    if declared is not None and media_type is not None and declared != media_type:
        raise InvalidManifestError(f"manifest mediaType {declared!r} differs from the given {media_type!r}")
    kind = declared or media_type
    if declared is None and kind in (mt.DOCKER_MANIFEST, mt.DOCKER_MANIFEST_LIST):
        # Docker's schema 2 requires the field; only OCI manifests may leave it out.
        raise InvalidManifestError(f"a {kind} manifest must declare its mediaType")
    if kind is None:
        kind = mt.OCI_INDEX if "manifests" in obj else mt.OCI_MANIFEST
    subject = Descriptor.from_dict(obj["subject"], "subject") if obj.get("subject") is not None else None
    artifact_type = obj.get("artifactType")
    if artifact_type is not None and not mt.is_valid_media_type(artifact_type):
        raise InvalidManifestError(f"artifactType {artifact_type!r} is not a valid media type")
    annotations = _annotations(obj.get("annotations"), "manifest")
    if kind in mt.IMAGE_MANIFEST_TYPES:
        if "manifests" in obj:
            raise InvalidManifestError("an image manifest must not have 'manifests'")
        config = Descriptor.from_dict(obj.get("config"), "config")
        layers_raw = obj.get("layers")
        if not isinstance(layers_raw, list):
            raise InvalidManifestError("manifest layers must be a list")
        layers = tuple(Descriptor.from_dict(d, f"layers[{i}]") for i, d in enumerate(layers_raw))
        if config.media_type == mt.OCI_EMPTY and artifact_type is None and kind == mt.OCI_MANIFEST:
            raise InvalidManifestError("artifactType must be set when config.mediaType is the empty type")
        return ImageManifest(config, layers, artifact_type, subject, annotations, kind)
    if kind in mt.INDEX_TYPES:
        if "config" in obj or "layers" in obj:
            raise InvalidManifestError("an image index must not have 'config' or 'layers'")
        entries = obj.get("manifests")
        if not isinstance(entries, list):
            raise InvalidManifestError("index manifests must be a list")
        manifests = tuple(Descriptor.from_dict(d, f"manifests[{i}]") for i, d in enumerate(entries))
        for i, d in enumerate(manifests):
            if d.media_type not in mt.MANIFEST_TYPES:
                raise InvalidManifestError(
                    f"manifests[{i}].mediaType {d.media_type!r} is not a manifest type"
                )
        return Index(manifests, artifact_type, subject, annotations, kind)
    raise InvalidManifestError(f"unsupported manifest media type {kind!r}")


@dataclass(frozen=True, slots=True)
class References:
    """What a manifest points at: blobs and child manifests it needs, and its optional subject."""

    blobs: tuple[Descriptor, ...]
    manifests: tuple[Descriptor, ...]
    subject: Descriptor | None


def references(manifest: Manifest) -> References:
    """Blobs a manifest needs stored: its config and layers, except non-distributable layers that
    name where they live (`urls`: Docker foreign layers), whose bytes a registry never holds."""
    if isinstance(manifest, ImageManifest):
        needed = tuple(d for d in manifest.blobs() if not (d.urls and mt.is_non_distributable(d.media_type)))
        return References(needed, (), manifest.subject)
    return References((), manifest.manifests, manifest.subject)
