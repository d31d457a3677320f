"""Typed HTTP client of the control plane and the gateway, used by the CLI and tests."""

from kingpost.client.http import KingpostClient, load_credentials

__all__ = ["KingpostClient", "load_credentials"]
