"""The log store: replica output, build output and the gateway's access lines, kept on
disk across restarts, bounded by size and age, and queried by one :class:`LogQuery`."""

from kingpost.logstore.collect import Collector, LogSettings
from kingpost.logstore.records import (
    LEVELS,
    LogQuery,
    Position,
    parse_level,
    parse_time,
    replica_record,
)
from kingpost.logstore.segments import SegmentWriter, position, prune, query, store_bytes

__all__ = [
    "LEVELS",
    "Collector",
    "LogQuery",
    "LogSettings",
    "Position",
    "SegmentWriter",
    "parse_level",
    "parse_time",
    "position",
    "prune",
    "query",
    "replica_record",
    "store_bytes",
]
