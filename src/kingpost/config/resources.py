"""``resources:`` and ``runtime:`` sections of a Truss config."""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import Field, field_serializer, field_validator, model_validator

from kingpost.config._base import ConfigModel

__all__ = [
    "KNOWN_ACCELERATORS",
    "Accelerator",
    "EgressRestrictions",
    "HealthChecks",
    "Oidc",
    "RemoteSsh",
    "Resources",
    "Runtime",
    "Transport",
    "TransportKind",
]

KNOWN_ACCELERATORS = frozenset(
    {
        "B10",
        "T4",
        "L4",
        "A10G",
        "V100",
        "A100",
        "A100_40GB",
        "H100",
        "H200",
        "H100_40GB",
        "B200",
        "L40S",
        "RTX_PRO_6000",
        "B300",
        "GB300",
    }
)
"""Accelerator kinds Truss accepts; others parse with a warning."""

_ACCELERATOR_KIND = re.compile(r"^[A-Za-z0-9_]+$")
_MILLI_CPU = re.compile(r"^([0-9]*\.?[0-9]+)m$")
_MEMORY = re.compile(r"^([0-9]*\.?[0-9]+)([a-zA-Z]+)?$")
_MEMORY_UNITS = {
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "Pi": 1024**5,
    "Ei": 1024**6,
}


@dataclass(frozen=True)
class Accelerator:
    """A GPU request: ``"H100:2"`` is ``Accelerator("H100", 2)``."""

    kind: str
    count: int = 1

    def __str__(self) -> str:
        return self.kind if self.count == 1 else f"{self.kind}:{self.count}"

    @classmethod
    def parse(cls, value: object) -> Accelerator | None:
        """Accept ``"A10G"``, ``"A10G:2"``, ``{accelerator|kind: A10G, count: 2}`` or null."""
        if value is None or value == "":
            return None
        if isinstance(value, Accelerator):
            return value
        if isinstance(value, dict):
            kind = value.get("accelerator", value.get("kind"))
            count = value.get("count", 1)
            if kind is None or (count == 0 and not isinstance(count, bool)):
                return None  # as in Truss, a count of 0 in this form asks for no GPU
            return cls._checked(str(kind), count)
        if not isinstance(value, str):
            raise ValueError("accelerator must be a string such as `A10G` or `H100:2`")
        kind, sep, count = value.strip().partition(":")
        return cls._checked(kind, count if sep else 1)

    @classmethod
    def _checked(cls, kind: str, count: object) -> Accelerator:
        if not _ACCELERATOR_KIND.match(kind):
            raise ValueError(
                "accelerator must be `KIND` or `KIND:COUNT` with a GPU kind such as "
                "`A10G`, `L4`, `H100` and a positive count, e.g. `H100:2`"
            )
        text = str(count)
        if isinstance(count, bool) or not text.isdigit() or int(text) <= 0:
            raise ValueError(
                f"accelerator count must be a positive integer, e.g. `{kind}:2`; found `{text}`"
            )
        return cls(kind, int(text))


MAX_CPU_CORES = 1024
"""The most ``resources.cpu`` may ask for: beyond any one machine, and far from the
integer limits of CPU quotas (an unbounded value overflows where it becomes one)."""
MAX_MEMORY_BYTES = 1024**5
"""The most ``resources.memory`` may ask for (1 PiB), for the same reasons."""


def _number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None  # `inf`, `nan`, `1e999`


def _plain_bytes(text: str) -> int | None:
    """A memory size written as a bare number Python reads (``1e9``): bytes, rounded up."""
    number = _number(text)
    if number is None or number < 0:
        return None
    return math.ceil(number)


def _cpu_cores(text: str) -> float | None:
    """``"500m"`` -> 0.5, ``"2"`` -> 2.0; None for what is not a finite number."""
    match = _MILLI_CPU.match(text)
    if match is None:
        return _number(text)
    number = _number(match.group(1))
    return None if number is None else number / 1000


def _memory_bytes(text: str) -> int | None:
    """``"2Gi"`` -> 2147483648, ``"1e9"`` -> 1000000000; None for what is not a finite size."""
    match = _MEMORY.match(text)
    if match is None:
        return _plain_bytes(text)
    if match.group(2) is not None and match.group(2) not in _MEMORY_UNITS:
        return None
    number = _number(match.group(1))
    factor = _MEMORY_UNITS[match.group(2)] if match.group(2) else 1
    return None if number is None else math.ceil(number * factor)


class Resources(ConfigModel):
    """Compute a replica asks for. ``use_gpu`` is derived from ``accelerator``."""

    cpu: str = "1"
    memory: str = "2Gi"
    accelerator: Accelerator | None = None
    use_gpu: bool = False
    instance_type: str | None = None
    node_count: int | None = Field(default=None, ge=1, strict=True)
    fabric: dict[str, Any] | None = None

    @field_validator("cpu")
    @classmethod
    def _check_cpu(cls, value: str) -> str:
        cores = _cpu_cores(value)
        if cores is not None and 0 < cores <= MAX_CPU_CORES:
            return value
        raise ValueError(
            "cpu must be a positive, finite number of cores or millicores, at most "
            f"{MAX_CPU_CORES} cores, e.g. `1`, `0.5` or `500m`"
        )

    @field_validator("memory")
    @classmethod
    def _check_memory(cls, value: str) -> str:
        size = _memory_bytes(value)  # `1e9` too, as Truss reads it: a number of bytes
        if size is not None and size <= MAX_MEMORY_BYTES:
            return value
        raise ValueError(
            "memory must be a finite number with an optional unit (Ki, Mi, Gi, Ti, k, M, G, "
            "T), at most 1Pi, e.g. `2Gi` or `512Mi`"
        )

    @field_validator("accelerator", mode="before")
    @classmethod
    def _parse_accelerator(cls, value: object) -> Accelerator | None:
        return Accelerator.parse(value)

    @model_validator(mode="after")
    def _derive_use_gpu(self) -> Resources:
        # Truss drops a given use_gpu and derives it from the accelerator.
        object.__setattr__(self, "use_gpu", self.accelerator is not None)
        return self

    @field_serializer("accelerator")
    def _dump_accelerator(self, value: Accelerator | None) -> str | None:
        return None if value is None else str(value)

    @property
    def cpu_millicores(self) -> int | None:
        """``"500m"`` -> 500, ``"2"`` -> 2000."""
        cores = _cpu_cores(self.cpu)
        return None if cores is None else math.ceil(cores * 1000)

    @property
    def memory_bytes(self) -> int | None:
        """``"2Gi"`` -> 2147483648, ``"512M"`` -> 512000000."""
        return _memory_bytes(self.memory)


class HealthChecks(ConfigModel):
    """Overrides of the platform's probe timings (seconds)."""

    restart_check_delay_seconds: int | None = Field(default=None, ge=0)
    restart_threshold_seconds: int | None = Field(default=None, ge=0)
    stop_traffic_threshold_seconds: int | None = Field(default=None, ge=0)
    startup_threshold_seconds: int | None = Field(default=None, ge=0)


class TransportKind(StrEnum):
    HTTP = "http"  # plain request/response and streaming HTTP
    WEBSOCKET = "websocket"  # a long-lived WebSocket per connection
    GRPC = "grpc"  # HTTP/2 gRPC


class Transport(ConfigModel):
    kind: TransportKind = TransportKind.HTTP
    ping_interval_seconds: float | None = None
    ping_timeout_seconds: float | None = None


class Oidc(ConfigModel):
    enabled: bool | None = None


class RemoteSsh(ConfigModel):
    enabled: bool = False


class EgressRestrictions(ConfigModel):
    ip_allow_list: list[str] | None = None
    fqdn_allow_list: list[str] | None = None

    @field_validator("ip_allow_list")
    @classmethod
    def _check_ips(cls, value: list[str] | None) -> list[str] | None:
        for entry in value or []:
            try:
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                network = None
            if network is None or network.version != 4:
                raise ValueError(
                    f"`{entry}` is not an IPv4 address or CIDR range, e.g. `10.0.0.0/8`"
                )
        return value


class Runtime(ConfigModel):
    """How the serving process behaves."""

    predict_concurrency: int = 1
    streaming_read_timeout: int = Field(default=60, gt=0)
    enable_tracing_data: bool = False
    enable_debug_logs: bool = False
    transport: Transport = Field(default_factory=Transport)
    is_websocket_endpoint: bool | None = None
    health_checks: HealthChecks = Field(default_factory=HealthChecks)
    oidc: Oidc = Field(default_factory=Oidc)
    remote_ssh: RemoteSsh = Field(default_factory=RemoteSsh)
    egress_restrictions: EgressRestrictions | None = None
    truss_server_version_override: str | None = None
    num_workers: int | None = None

    @field_validator("predict_concurrency")
    @classmethod
    def _check_concurrency(cls, value: int) -> int:
        if value < 1:
            raise ValueError(
                "predict_concurrency must be at least 1; set it to the number of requests "
                "your predict can run at once, e.g. 1 or 32"
            )
        return value

    @field_validator("num_workers")
    @classmethod
    def _check_workers(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError(
                "only 1 worker per server is allowed (Truss >= 0.9.49); remove `num_workers` "
                "and raise `predict_concurrency` or the replica count instead"
            )
        return value

    @field_validator("transport", mode="before")
    @classmethod
    def _default_transport(cls, value: object) -> object:
        return {"kind": "http"} if value is None or value == {} else value

    @model_validator(mode="after")
    def _sync_websocket(self) -> Runtime:
        # Legacy `is_websocket_endpoint: true` means transport.kind websocket.
        transport = self.transport
        if self.is_websocket_endpoint and transport.kind != TransportKind.WEBSOCKET:
            transport = Transport(kind=TransportKind.WEBSOCKET)
            object.__setattr__(self, "transport", transport)
        object.__setattr__(self, "is_websocket_endpoint", transport.kind == TransportKind.WEBSOCKET)
        return self
