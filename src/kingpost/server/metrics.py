"""Request counts and latency histograms in Prometheus text format.

Plain dicts and a bisect per request: no client library on the hot path.
"""

from __future__ import annotations

from bisect import bisect_left

__all__ = ["Metrics"]

_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class _Histogram:
    __slots__ = ("count", "counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)
        self.count = 0
        self.total = 0.0


class Metrics:
    """Counters by (route, status) and latency histograms by route.

    A stream's status is the one its head carried; a stream cut after its head (the
    model raised, no chunk came within ``streaming_read_timeout``, the client left) is
    counted again by :meth:`stream_cut`, so a 200 in the request counts does not hide it.
    """

    def __init__(self) -> None:
        self._requests: dict[tuple[str, int], int] = {}
        self._latency: dict[str, _Histogram] = {}
        self._cut: dict[str, int] = {}
        self.in_flight = 0

    def stream_cut(self, reason: str) -> None:
        self._cut[reason] = self._cut.get(reason, 0) + 1

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        hist = self._latency.get(route)
        if hist is None:
            hist = self._latency[route] = _Histogram()
        hist.counts[bisect_left(_BUCKETS, seconds)] += 1
        hist.count += 1
        hist.total += seconds

    def requests(self, route: str, status: int) -> int:
        return self._requests.get((route, status), 0)

    def render(self) -> str:
        out = [
            "# HELP kingpost_model_requests_total Requests answered by the model server.",
            "# TYPE kingpost_model_requests_total counter",
        ]
        for (route, status), n in sorted(self._requests.items()):
            out.append(f'kingpost_model_requests_total{{route="{route}",status="{status}"}} {n}')
        out += [
            "# HELP kingpost_model_request_duration_seconds Time to answer (headers) a request.",
            "# TYPE kingpost_model_request_duration_seconds histogram",
        ]
        for route, hist in sorted(self._latency.items()):
            cumulative = 0
            for bound, n in zip(_BUCKETS, hist.counts, strict=False):
                cumulative += n
                out.append(
                    f'kingpost_model_request_duration_seconds_bucket{{route="{route}",'
                    f'le="{bound}"}} {cumulative}'
                )
            out.append(
                f'kingpost_model_request_duration_seconds_bucket{{route="{route}",le="+Inf"}} '
                f"{hist.count}"
            )
            out.append(
                f'kingpost_model_request_duration_seconds_sum{{route="{route}"}} {hist.total:.6f}'
            )
            out.append(
                f'kingpost_model_request_duration_seconds_count{{route="{route}"}} {hist.count}'
            )
        out += [
            "# HELP kingpost_model_streams_cut_total Streams ended after their head was sent, "
            "by why (model_error, timeout, client_left).",
            "# TYPE kingpost_model_streams_cut_total counter",
        ]
        for reason, n in sorted(self._cut.items()):
            out.append(f'kingpost_model_streams_cut_total{{reason="{reason}"}} {n}')
        out += [
            "# HELP kingpost_model_requests_in_flight Predict requests being served.",
            "# TYPE kingpost_model_requests_in_flight gauge",
            f"kingpost_model_requests_in_flight {self.in_flight}",
        ]
        return "\n".join(out) + "\n"
