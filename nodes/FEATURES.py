"""The feature modules whose ``NODES`` the pack registers (kept in one place)."""
from . import nodes_conditioning, nodes_loader

MODULES = [nodes_loader, nodes_conditioning]
