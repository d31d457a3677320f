"""Async inference: a durable priority queue in the store, workers in the control plane
that run its requests on replicas, and signed webhooks. See docs/architecture.md."""

from kingpost.asyncq.body import DEFAULT_PAYLOAD_LIMIT, AsyncInput, parse_async_body
from kingpost.asyncq.policy import Candidate, Choice, RetryConfig, choose, retry_delay_ms

__all__ = [
    "DEFAULT_PAYLOAD_LIMIT",
    "AsyncInput",
    "Candidate",
    "Choice",
    "RetryConfig",
    "choose",
    "parse_async_body",
    "retry_delay_ms",
]
