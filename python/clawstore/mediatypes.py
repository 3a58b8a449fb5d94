"""Media types: OCI image-spec v1.1 and the ElasticClaw artifact kinds."""

from __future__ import annotations

import re
from typing import Final

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_EMPTY: Final = "application/vnd.oci.empty.v1+json"
OCI_LAYER_TAR: Final = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_TAR_ZSTD: Final = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_TAR_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
OCTET_STREAM: Final = "application/octet-stream"

CHECKPOINT: Final = "application/vnd.elasticclaw.checkpoint.v1+json"
VOLUME: Final = "application/vnd.elasticclaw.volume.v1+json"
VOLUME_LAYER: Final = "application/vnd.elasticclaw.volume.layer.v1.tar+zstd"
VOLUME_INDEX: Final = "application/vnd.elasticclaw.volume.index.v1+json"
#: The file index of a volume snapshot as volumes.py stores it: VOLUME_INDEX JSON, zstd-compressed.
VOLUME_INDEX_ZSTD: Final = "application/vnd.elasticclaw.volume.index.v1+json+zstd"
#: The file index as volumes.py stores it now: binary records (version 2), zstd-compressed
#: (`_core.decode_index` reads both).
VOLUME_INDEX_V2_ZSTD: Final = "application/vnd.elasticclaw.volume.index.v2+zstd"
CHECKPOINT_FILE: Final = "application/vnd.elasticclaw.checkpoint.file.v1"
#: A log: artifactType of the manifest; its layers are LOG_SEGMENT blobs in order.
LOG: Final = "application/vnd.elasticclaw.log.v1+json"
#: One sealed log segment: a zstd skippable frame of time marks, then one zstd frame of the bytes.
LOG_SEGMENT: Final = "application/vnd.elasticclaw.log.segment.v1+zstd"
#: A cache entry: artifactType and config mediaType; layers as volumes', then its file index.
CACHE: Final = "application/vnd.elasticclaw.cache.v1+json"
CACHE_LAYER: Final = "application/vnd.elasticclaw.cache.layer.v1.tar+zstd"
CACHE_INDEX_ZSTD: Final = "application/vnd.elasticclaw.cache.index.v2+zstd"
#: A checkpoint's config: session metadata, pack table and file index, zstd-compressed JSON.
CHECKPOINT_CONFIG_ZSTD: Final = "application/vnd.elasticclaw.checkpoint.config.v1+json+zstd"
#: A checkpoint's file index shared by later checkpoints (their configs hold what differs).
CHECKPOINT_INDEX_ZSTD: Final = "application/vnd.elasticclaw.checkpoint.index.v1+json+zstd"
#: A checkpoint pack: tar+zstd cut into independent zstd frames (see clawstore.checkpoints).
CHECKPOINT_PACK: Final = "application/vnd.elasticclaw.checkpoint.pack.v1.tar+zstd"

#: The empty JSON object `{}` used as config when a kind has none (OCI 1.1).
EMPTY_JSON: Final = b"{}"
EMPTY_DIGEST: Final = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"

#: Docker image manifest v2 schema 2 and manifest list: the same shapes as the OCI image
#: manifest and index (OCI's were derived from them), still what docker and many registries push.
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR_GZIP: Final = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER: Final = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

#: Manifests with config + layers, and indexes listing manifests.
IMAGE_MANIFEST_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES: Final = IMAGE_MANIFEST_TYPES | INDEX_TYPES


def is_non_distributable(media_type: str) -> bool:
    """Layers that live elsewhere (their descriptor's `urls`): Docker foreign layers and the
    (deprecated) OCI non-distributable layers. A registry does not hold their bytes."""
    return media_type == DOCKER_FOREIGN_LAYER or ".nondistributable." in media_type


# RFC 6838 restricted-name, as the OCI descriptor spec requires of mediaType.
_RESTRICTED = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
MEDIA_TYPE_RE: Final = re.compile(rf"{_RESTRICTED}/{_RESTRICTED}")


def is_valid_media_type(value: object) -> bool:
    return isinstance(value, str) and MEDIA_TYPE_RE.fullmatch(value) is not None
