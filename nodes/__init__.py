"""ComfyUI adapters: thin node classes that call into ``blip_core``.

One module per feature; each exports ``NODES``.
"""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from . import paths


class BlipDiffusionExtension(ComfyExtension):
    @override
    async def on_load(self) -> None:
        paths.register_model_folders()

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        paths.register_model_folders()
        from . import FEATURES

        nodes: list[type[io.ComfyNode]] = []
        for feature in FEATURES.MODULES:
            nodes.extend(feature.NODES)
        return nodes
