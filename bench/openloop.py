"""Builds and runs ``bench/loadgen.c``, the open-loop load generator the benchmarks share.

The binary is compiled with the system C compiler into ``.bench-cache/`` the first time
(and again when the source changes). :func:`run` sends requests on a fixed schedule and
returns the generator's JSON report: ``completed`` (``answered`` also counts the warm-up),
``rate``, ``p50``/``p90``/``p99``/``p999``/``max`` in milliseconds, counted from when each
request was due.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "bench" / "loadgen.c"
CACHE = ROOT / ".bench-cache"


def ensure_built(cache: Path = CACHE) -> Path:
    """The compiled generator, built now if missing or older than its source."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    binary = cache / f"loadgen-{digest}"
    if binary.exists():
        return binary
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("a C compiler is needed for bench/loadgen.c (apt-get install gcc)")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(".tmp")
    subprocess.run([cc, "-O2", "-o", str(tmp), str(SOURCE), "-lm"], check=True)
    tmp.replace(binary)
    return binary


def http_request(
    path: str, body: bytes = b"", headers: dict[str, str] | None = None, method: str = "POST"
) -> bytes:
    """Raw HTTP/1.1 request bytes for the generator."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def run(
    port: int,
    request: bytes,
    *,
    rate: float,
    connections: int,
    seconds: float,
    warmup: float = 1.0,
    core: int | None = None,
    poisson: bool = False,
) -> dict[str, Any]:
    binary = ensure_built()
    with tempfile.NamedTemporaryFile(prefix="kp-request-", suffix=".bin") as f:
        f.write(request)
        f.flush()
        cmd = [str(binary), "-p", str(port), "-c", str(connections), "-r", f"{rate:.1f}"]
        cmd += ["-d", str(seconds), "-w", str(warmup)] + (["-P"] if poisson else []) + [f.name]
        if core is not None:
            cmd = ["taskset", "-c", str(core), *cmd]
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=seconds + warmup + 60, check=True
        )
    result: dict[str, Any] = json.loads(out.stdout)
    return result
