"""The web console: server-rendered pages over the control-plane API (``/console``)."""

from kingpost.console.web import console_routes

__all__ = ["console_routes"]
