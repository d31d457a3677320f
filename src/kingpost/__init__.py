"""Kingpost: a self-hosted inference platform for Truss projects."""

from kingpost.errors import KingpostError

__all__ = ["KingpostError", "__version__"]
__version__ = "0.1.0"
