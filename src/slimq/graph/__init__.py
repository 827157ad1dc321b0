"""Dataflow discovery from a real forward pass, and what it tells about channels and layers."""
from .dataflow import Dataflow, External, Node, Opaque, Value, ValueRef
from .trace import trace

__all__ = ["Dataflow", "External", "Node", "Opaque", "Value", "ValueRef", "trace"]
