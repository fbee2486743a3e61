"""BlipControlNetLoader: the released folder's canny ControlNet, for subject-driven stylisation."""
import os

from comfy_api.latest import io

from . import paths
from .host_controlnet import load_controlnet


class BlipControlNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipControlNetLoader",
            display_name="Load BLIP-Diffusion ControlNet",
            category="blip_diffusion",
            description=(
                "Loads the ControlNet shipped in a BLIP-Diffusion model folder (its controlnet/ subfolder, a "
                "diffusers ControlNetModel; the released one is the canny edge ControlNet) as the host's own "
                "CONTROL_NET, for Apply ControlNet. For subject-driven stylisation as published, apply it with "
                "strength 1.0 over the whole schedule to both positive and negative conditioning, with a canny "
                "edge image at the output size."),
            inputs=[
                io.Combo.Input("model_name", options=paths.list_model_folders(having="controlnet"),
                               tooltip="A folder under models/blip_diffusion/ that holds model_index.json and a "
                                       "controlnet/ subfolder (for example the released 'blipdiffusion-controlnet' "
                                       "folder)."),
            ],
            outputs=[
                io.ControlNet.Output(tooltip="The ControlNet; its residuals are added to the UNet's skip "
                                             "connections and middle block."),
            ],
        )

    @classmethod
    def execute(cls, model_name) -> io.NodeOutput:
        folder = os.path.join(paths.resolve_model_folder(model_name, having="controlnet"), "controlnet")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"BLIP-Diffusion model folder '{model_name}' has no controlnet/ subfolder: choose "
                                    "a folder that ships the ControlNet (the released 'blipdiffusion-controlnet')")
        return io.NodeOutput(load_controlnet(folder))


NODES = [BlipControlNetLoader]
