"""Prometheus metrics: the control plane's ``/metrics`` (see ``docs/architecture.md``,
"Metrics"). :mod:`kingpost.metrics.platform` collects, :mod:`kingpost.metrics.text` renders,
:mod:`kingpost.metrics.replicas` scrapes the replicas' own."""
