"""The HTTP API: the spec's endpoints and what an operator needs around them."""

from egressd.api.app import create_app
from egressd.api.deps import Services

__all__ = ["Services", "create_app"]
