"""egressd: per-container egress policy through an upstream proxy, or none at all."""

__version__ = "0.1.0"
