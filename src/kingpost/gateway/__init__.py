"""The gateway: Kingpost's data plane. Routes by a table the controller pushes."""

from kingpost.gateway.control import (
    control_socket_paths,
    fetch_demand,
    fetch_stats,
    push_table,
)
from kingpost.gateway.stats import GatewayStats, merge_snapshots
from kingpost.gateway.table import RoutingTable

__all__ = [
    "GatewayStats",
    "RoutingTable",
    "control_socket_paths",
    "fetch_demand",
    "fetch_stats",
    "merge_snapshots",
    "push_table",
]
