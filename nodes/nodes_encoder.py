"""The subject encoder in the graph: its loader and SubjectEncode."""
import logging
import os

import torch

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
from comfy_api.latest import io

from ..blip_core import encoder_weights
from ..blip_core.preprocess import PREPROCESSING_STYLES
from ..blip_core.subject import Subject, weights_fingerprint
from . import host_models, paths
from .types import SubjectEncoderType, SubjectType

log = logging.getLogger("blip_diffusion")
MIN_SIDE = 32  # smaller subject photos are accepted with a warning

class EncoderHandle:
    """A loaded subject encoder under the host's model management (moved to the GPU when used)."""

    def __init__(self, encoder, name: str, dtype: torch.dtype | None = None):
        # Fingerprinted as loaded (fp32), before the cast to a GPU's half type, so that a subject file
        # made on one machine matches the same encoder on another.
        self.fingerprint = weights_fingerprint(encoder.state_dict())
        self.encoder = encoder if dtype is None else encoder.to(dtype)
        self.name = name
        self.patcher = comfy.model_patcher.ModelPatcher(self.encoder, load_device=mm.text_encoder_device(),
                                                        offload_device=mm.text_encoder_offload_device())

    def encode(self, images, category, weights=None, preprocessing="diffusers") -> torch.Tensor:
        # Whole or not at all: the host's partial load leaves parameters that sit directly on a module
        # with children (query tokens, class and position embeddings) behind on the CPU.
        mm.load_models_gpu([self.patcher], force_full_load=True)
        with torch.inference_mode():
            return self.encoder.encode(images, category, weights=weights, preprocessing=preprocessing).float().cpu()


def encoder_dtype(device) -> torch.dtype:
    """fp32 on CPU (exact); on a GPU the half type the host would pick for a model this size."""
    if torch.device(device).type == "cpu":
        return torch.float32
    if mm.should_use_bf16(device, prioritize_performance=True):
        return torch.bfloat16
    if mm.should_use_fp16(device, prioritize_performance=True):
        return torch.float16
    return torch.float32


def load_encoder(path: str, name: str, dtype: torch.dtype | None = None) -> EncoderHandle:
    """``dtype``: the compute type, by default the one the host's text-encoder device calls for."""
    where = encoder_weights.locate(path)
    for file in where.files:
        host_models.check_weights_file(file, f"subject encoder '{name}'")
    encoder = encoder_weights.load(where, dtype=torch.float32, device=mm.text_encoder_offload_device())
    return EncoderHandle(encoder, name, dtype or encoder_dtype(mm.text_encoder_device()))


def is_lavis_folder(path: str) -> bool:
    """A LAVIS checkpoint folder (blip_model/ + proj_layer/)."""
    return encoder_weights.locate(path).layout == "lavis"


def encoder_choices() -> list[str]:
    """Model folders and LAVIS checkpoint folders, plus single encoder files that belong to neither."""
    folders = paths.list_model_folders(also=is_lavis_folder)
    files = [f for f in folder_paths.get_filename_list(paths.BLIP_FOLDER)
             if not any(f.startswith(d.rstrip("/") + "/") or f.startswith(d.rstrip(os.sep) + os.sep) for d in folders)
             and f.endswith((".safetensors", ".pt", ".pth", ".bin"))]
    return folders + files


def resolve_encoder(name: str) -> str:
    try:
        folder = paths.resolve_model_folder(name, also=is_lavis_folder)
    except FileNotFoundError:
        path = folder_paths.get_full_path(paths.BLIP_FOLDER, name)
        if path is None:
            raise FileNotFoundError(f"subject encoder '{name}' not found in models/{paths.BLIP_FOLDER}/: put a "
                                    "released model folder or an encoder file there and choose it in encoder_name")
        return path
    if is_lavis_folder(folder):
        return folder   # load_encoder reads its layout
    if not os.path.isdir(os.path.join(folder, "qformer")):
        raise FileNotFoundError(f"model folder '{name}' has no qformer/ subfolder (the subject encoder): copy it "
                                "from the released folder, or choose an encoder file")
    return os.path.join(folder, "qformer")


class BlipSubjectEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipSubjectEncoderLoader",
            display_name="Load Subject Encoder",
            category="blip_diffusion",
            description=("Loads only the BLIP-2 subject encoder (vision transformer, Q-Former, projection): from a "
                         "released model folder's qformer/, a single .safetensors encoder file, or a LAVIS "
                         "checkpoint folder (blip_model/, proj_layer/). Use it with the host's own loaders for "
                         "the UNet, CLIP and VAE."),
            inputs=[io.Combo.Input("encoder_name", options=encoder_choices(),
                                   tooltip="A model folder or encoder file under models/blip_diffusion/.")],
            outputs=[SubjectEncoderType.Output(tooltip="The subject encoder, for SubjectEncode.")],
        )

    @classmethod
    def execute(cls, encoder_name) -> io.NodeOutput:
        return io.NodeOutput(load_encoder(resolve_encoder(encoder_name), encoder_name))


def parse_weights(text: str, count: int):
    text = (text or "").strip()
    if not text:
        return None
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"image_weights must be numbers separated by commas, got {text!r}") from None
    if len(values) != count:
        raise ValueError(f"image_weights has {len(values)} numbers but {count} images are connected")
    return values


class SubjectEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SubjectEncode",
            display_name="Subject Encode",
            category="blip_diffusion",
            description=("Turns photos of one subject and its category word into a BLIP-Diffusion subject "
                         "embedding (16 vectors in the text encoder's space). Several photos (an image batch) are "
                         "encoded one by one and averaged, optionally weighted. Transparent pixels of 4-channel "
                         "images are composited over white (Load Image alone drops alpha: join its MASK back with "
                         "Join Image with Alpha); grayscale photos are used as RGB."),
            inputs=[
                SubjectEncoderType.Input("subject_encoder", tooltip="From Load BLIP-Diffusion or Load Subject Encoder."),
                io.Image.Input("images", tooltip="One or more photos of the same subject (a batch). Any size: they "
                                                 "are resized to 224x224 as the released model expects."),
                io.String.Input("category", default="dog",
                                tooltip="What the subject is, in a word or two: 'dog', 'teapot', 'red sneaker'."),
                io.String.Input("image_weights", default="", optional=True,
                                tooltip="Optional weights, one per image, comma-separated (e.g. '2, 1, 1'); "
                                        "normalised to sum 1. Empty: plain mean."),
                io.Combo.Input("preprocess", options=list(PREPROCESSING_STYLES), default="diffusers", optional=True,
                               tooltip="diffusers: stretch to 224x224 as the released pipeline does (default). "
                                       "lavis: resize the short side to 224 and centre-crop, as the original code."),
            ],
            outputs=[SubjectType.Output(tooltip="The subject, for SubjectConditioning, SubjectInterpolate or "
                                                "SaveSubject.")],
        )

    @classmethod
    def validate_inputs(cls, category=None):
        # Only `category` is named (no **kwargs, which would make the host skip its own checks of every other
        # input). A category linked from another node arrives as None here and is checked when the node runs.
        if category is None:
            return True
        if not isinstance(category, str) or not category.strip():
            return "category is empty: name what the subject is, e.g. 'dog'"
        return True

    @classmethod
    def execute(cls, subject_encoder, images, category, image_weights="", preprocess="diffusers") -> io.NodeOutput:
        if images is None or images.ndim != 4 or images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
            shape = None if images is None else tuple(images.shape)
            raise ValueError(f"SubjectEncode got an empty image batch {shape}: connect at least one photo")
        if min(images.shape[1], images.shape[2]) < MIN_SIDE:
            log.warning("SubjectEncode: the subject image is only %dx%d pixels; it is stretched to 224x224 and "
                        "carries almost no detail of the subject: use a photo at least 224 pixels wide",
                        images.shape[2], images.shape[1])
        weights = parse_weights(image_weights, images.shape[0])
        embedding = subject_encoder.encode(images, category.strip(), weights=weights, preprocessing=preprocess)
        meta = {"encoder": subject_encoder.name, "encoder_fingerprint": subject_encoder.fingerprint,
                "images": images.shape[0], "preprocess": preprocess}
        return io.NodeOutput(Subject(embedding, category.strip(), meta))


NODES = [BlipSubjectEncoderLoader, SubjectEncode]
