"""BlipDiffusionLoader: the released folder as the host's MODEL, CLIP and VAE (plus the encoder)."""
import os

import folder_paths
from comfy_api.latest import io

from . import host_models, paths
from .nodes_encoder import load_encoder
from .types import SubjectEncoderType


COMPONENTS = ("unet", "text_encoder", "vae", "qformer")


def check_components(folder: str, model_name: str) -> None:
    """Every component present and its weights file intact, before gigabytes are loaded."""
    for part in COMPONENTS:
        sub = os.path.join(folder, part)
        if not os.path.isdir(sub):
            raise FileNotFoundError(
                f"model folder '{model_name}' has no {part}/ subfolder: copy the complete released folder "
                f"({', '.join(p + '/' for p in COMPONENTS)} each with config.json and weights)")
        host_models.check_weights_file(host_models.component_weights(sub), f"{model_name}/{part}")


class BlipDiffusionLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionLoader",
            display_name="Load BLIP-Diffusion",
            category="blip_diffusion",
            description=(
                "Loads a BLIP-Diffusion model folder in the released diffusers layout (model_index.json, "
                "qformer/, text_encoder/, unet/, vae/) from models/blip_diffusion/. The UNet, text encoder and "
                "VAE become the host's own MODEL, CLIP and VAE, so every sampler and conditioning node works "
                "with them; the subject encoder feeds SubjectEncode."),
            inputs=[
                io.Combo.Input("model_name", options=paths.list_model_folders(),
                               tooltip="A folder under models/blip_diffusion/ that holds model_index.json "
                                       "(for example the released 'blipdiffusion' folder)."),
            ],
            outputs=[
                io.Model.Output(tooltip="The SD 1.5 UNet fine-tuned for subject conditioning."),
                io.Clip.Output(tooltip="The CLIP ViT-L/14 text encoder; subject vectors are spliced into its input."),
                io.Vae.Output(tooltip="The SD 1.5 VAE."),
                SubjectEncoderType.Output(tooltip="The BLIP-2 subject encoder (qformer/), for SubjectEncode."),
            ],
        )

    @classmethod
    def execute(cls, model_name) -> io.NodeOutput:
        folder = paths.resolve_model_folder(model_name)
        check_components(folder, model_name)
        model = host_models.load_unet(os.path.join(folder, "unet"))
        clip = host_models.load_clip(os.path.join(folder, "text_encoder"),
                                     embedding_directory=folder_paths.get_folder_paths("embeddings"))
        vae = host_models.load_vae(os.path.join(folder, "vae"))
        encoder = load_encoder(os.path.join(folder, "qformer"), model_name)
        return io.NodeOutput(model, clip, vae, encoder)


NODES = [BlipDiffusionLoader]
