"""The store: the one source of truth (SQLite embedded, PostgreSQL by URL)."""

from egressd.store.db import make_engine, migrate
from egressd.store.nodes import NodeView
from egressd.store.repository import Store, hash_token
from egressd.store.views import (
    ContainerView,
    DesiredView,
    NetworkView,
    ObservedView,
    PrincipalView,
)

__all__ = [
    "ContainerView",
    "DesiredView",
    "NetworkView",
    "NodeView",
    "ObservedView",
    "PrincipalView",
    "Store",
    "hash_token",
    "make_engine",
    "migrate",
]
