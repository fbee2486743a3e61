"""ComfyUI adapters: thin node classes that call into ``blip_core``.

One module per feature; each exports ``NODES``.
"""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from . import paths, samples


def _prepare_host() -> None:
    paths.register_model_folders()
    samples.provide_sample_inputs()


class BlipDiffusionExtension(ComfyExtension):
    @override
    async def on_load(self) -> None:
        _prepare_host()

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        _prepare_host()  # hosts up to 0.3.75 never call on_load; both steps are idempotent
        from . import FEATURES

        nodes: list[type[io.ComfyNode]] = []
        for feature in FEATURES.MODULES:
            nodes.extend(feature.NODES)
        return nodes
