"""Entry point: ``python -m kingpost.server --app-dir DIR --port PORT``."""

from __future__ import annotations

import sys

from kingpost.server.main import main

if __name__ == "__main__":
    sys.exit(main())
