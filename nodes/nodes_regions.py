"""Subjects in Regions: several subjects in one picture, each holding its own region."""
import node_helpers
from comfy_api.latest import io

from ..blip_core import regions
from .nodes_conditioning import encode_subject_prompt
from .types import SubjectType

SLOTS = 4  # subjects a node takes; the first two are required


def masked(conditioning, region):
    """The host's own ConditioningSetMask values: the region as a mask at full strength."""
    return node_helpers.conditioning_set_values(conditioning, {"mask": region[None], "set_area_to_bounds": False,
                                                               "mask_strength": 1.0})


class SubjectRegions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        subject_inputs = []
        default_boxes = ["0, 0, 0.5, 1", "0.5, 0, 0.5, 1", "0, 0, 0.5, 0.5", "0.5, 0.5, 0.5, 0.5"]
        for k in range(1, SLOTS + 1):
            optional = k > 2
            subject_inputs += [
                SubjectType.Input(f"subject_{k}", optional=optional,
                                  tooltip=f"Subject {k} (Subject Encode, Subject Interpolate or Load Subject)."
                                          + (" Optional." if optional else "")),
                io.String.Input(f"box_{k}", default=default_boxes[k - 1], optional=optional,
                                tooltip=f"Where subject {k} goes: 'x, y, width, height' as fractions of the "
                                        "picture from its top left ('0, 0, 0.5, 1' is the left half). Unused when "
                                        f"mask_{k} is connected." + (" Optional." if optional else "")),
                io.Mask.Input(f"mask_{k}", optional=True,
                              tooltip=f"Where subject {k} goes (white), from any mask node: drawn in the mask "
                                      f"editor, a channel of an image, a segmentation. Replaces box_{k}."),
            ]
        return io.Schema(
            node_id="SubjectRegions",
            display_name="Subjects in Regions",
            category="blip_diffusion",
            description=(
                "Two or more subjects in one picture. Each subject is conditioned as Subject Conditioning does "
                "('a {its category} {scene prompt}' with its 16 vectors) and holds its region (box or mask); the "
                "scene prompt alone holds the rest of the picture. The result goes to the sampler's positive "
                "input like any conditioning; regions that overlap share the place."),
            inputs=[
                io.Clip.Input("clip", tooltip="The BLIP-Diffusion text encoder (an SD 1.x CLIP-L)."),
                io.String.Input("scene_prompt", multiline=True, default="",
                                tooltip="What the picture shows, e.g. 'sitting on a sofa in a sunny room'. Each "
                                        "subject's category is prepended for its own region, where the text is "
                                        "read as written, as in Subject Conditioning; the host's (word:1.2) "
                                        "weights and embedding: names apply in the scene's own region only."),
                *subject_inputs,
            ],
            outputs=[io.Conditioning.Output(tooltip="Positive conditioning: every subject in its region, the "
                                                    "scene prompt around them.")],
        )

    @classmethod
    def execute(cls, clip, scene_prompt, **slots) -> io.NodeOutput:
        names = [f"subject_{k}" for k in range(1, SLOTS + 1) if slots.get(f"subject_{k}") is not None]
        if len(names) < 2:
            raise ValueError("Subjects in Regions needs at least two subjects; for one, use Subject Conditioning")
        try:
            maps, scene = regions.layout([slots.get(n.replace("subject", "mask")) for n in names],
                                         [slots.get(n.replace("subject", "box"), "") for n in names], names)
        except regions.RegionError as err:
            raise ValueError(f"Subjects in Regions: {err}") from None
        out = []
        if scene.gt(0).any():  # the subjects may cover the whole picture
            out += masked(clip.encode_from_tokens_scheduled(clip.tokenize(scene_prompt)), scene)
        for name, region in zip(names, maps):
            subject = slots[name]
            _, cond, pooled = encode_subject_prompt(clip, subject, scene_prompt, subject.category,
                                                    node="Subjects in Regions", label=name)
            out += masked([[cond, {"pooled_output": pooled}]], region)
        return io.NodeOutput(out)


NODES = [SubjectRegions]
