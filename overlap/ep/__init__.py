"""Expert-parallel communication: dispatch tokens to the ranks of their experts and combine results."""
from overlap.ep.backends import available_backends, backend_names
from overlap.ep.buffer import EPBuffer
from overlap.ep.events import EPEvent
from overlap.ep.handle import DispatchHandle
from overlap.ep.layout import RoutingLayout, gather_reduce, permute_rows, routing_layout

__all__ = ["EPBuffer", "EPEvent", "DispatchHandle", "RoutingLayout", "available_backends", "backend_names",
           "gather_reduce", "permute_rows", "routing_layout"]
