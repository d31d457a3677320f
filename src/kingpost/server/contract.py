"""Names the platform and the model server agree on; imported by both sides."""

from __future__ import annotations

__all__ = ["ENVIRONMENT_ENV"]

ENVIRONMENT_ENV = "KINGPOST_ENVIRONMENT"
"""JSON (``{"name": "production"}``) of the environment the deployment was promoted to
when the replica started; unset for a deployment in no environment."""
