"""The model server that runs a Truss ``model/model.py`` inside each replica.

Run it as ``python -m kingpost.server --app-dir DIR --port PORT``. The hot path
is a protocol-level asyncio HTTP/1.1 server on httptools (uvloop when
installed); starlette is imported only when a model asks for its ``Request``
or returns its ``Response``. Nothing here is imported by the control plane
except :mod:`kingpost.server.scaffold` and :mod:`kingpost.server.contract`.
"""

from __future__ import annotations

__all__: list[str] = []
