"""The gateway: Kingpost's data plane. Routes by a table the controller pushes."""

from kingpost.gateway.control import control_socket_paths, push_table
from kingpost.gateway.table import RoutingTable

__all__ = ["RoutingTable", "control_socket_paths", "push_table"]
