"""BLIP-Diffusion for ComfyUI: subject-driven generation as custom nodes.

The host imports this file from ``custom_nodes/``; registration uses the V3
``comfy_entrypoint`` convention. The node modules are imported lazily so that
``blip_core`` stays importable without a host (tests, scripts).
"""

# Served by the host: web/docs/<NodeId>.md are the nodes' help pages in the frontend.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import BlipDiffusionExtension

    return BlipDiffusionExtension()
