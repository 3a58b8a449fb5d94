"""The hub control plane: catalog (SQL), permissions, leases, retention, GC, fsck, OCI layouts.

`clawstore.hub.Hub` is the entry point; see its module for the push protocol and
`clawstore.hub.gc` for why online GC is safe with pushes in flight.
"""

from clawstore.hub.catalog import Catalog
from clawstore.hub.fsck import FsckReport
from clawstore.hub.gc import GarbageCollector, GCReport
from clawstore.hub.hub import Hub
from clawstore.hub.leases import Lease, VolumeLease
from clawstore.hub.permissions import ACTIONS, Principal
from clawstore.hub.retention import Policy, RetentionReport
from clawstore.hub.session import HubSession, SessionBackend

__all__ = [
    "ACTIONS",
    "Catalog",
    "FsckReport",
    "GCReport",
    "GarbageCollector",
    "Hub",
    "HubSession",
    "Lease",
    "Policy",
    "Principal",
    "RetentionReport",
    "SessionBackend",
    "VolumeLease",
]
