"""The web dashboard the dispatcher serves beside its WebSocket (issue #17)."""

from .server import Dashboard

__all__ = ["Dashboard"]
