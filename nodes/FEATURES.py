"""The feature modules whose ``NODES`` the pack registers (kept in one place)."""
from . import nodes_loader

MODULES = [nodes_loader]
