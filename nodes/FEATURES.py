"""The feature modules whose ``NODES`` the pack registers (kept in one place)."""
from . import (nodes_conditioning, nodes_controlnet, nodes_edit, nodes_encoder, nodes_finetune, nodes_interpolate,
               nodes_loader, nodes_regions, nodes_sampler, nodes_subject_files)

MODULES = [nodes_loader, nodes_encoder, nodes_conditioning, nodes_regions, nodes_sampler, nodes_subject_files,
           nodes_interpolate, nodes_controlnet, nodes_finetune, nodes_edit]
