"""SubjectConditioning: a subject spliced into the host's own CLIP conditioning."""
import logging

from comfy_api.latest import io

from ..blip_core import prompting
from . import host_clip
from .types import SubjectType

log = logging.getLogger("blip_diffusion")


class SubjectConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SubjectConditioning",
            display_name="Subject Conditioning",
            category="blip_diffusion",
            description=(
                "Encodes a prompt with the subject spliced in, exactly as BLIP-Diffusion was published: the text "
                "'a {category} {prompt}' is repeated prompt_strength x prompt_reps times, tokenised and cut to "
                "61 tokens, and the subject's 16 vectors are inserted after 'a' (77 positions in all). The "
                "repetitions are meant to be cut; if your prompt alone is longer than the window, the words "
                "that do not fit are dropped and named in a warning in the server log. Connect the result to "
                "any sampler as the positive conditioning; use an ordinary CLIPTextEncode for the negative."),
            inputs=[
                io.Clip.Input("clip", tooltip="The BLIP-Diffusion text encoder (an SD 1.x CLIP-L)."),
                SubjectType.Input("subject", tooltip="The subject from SubjectEncode, SubjectInterpolate or "
                                                      "LoadSubject."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What to render the subject doing or where, e.g. 'on a beach at "
                                        "sunset'. The category is prepended for you."),
                io.String.Input("target_category", default="",
                                tooltip="The category word used in the prompt; empty uses the subject's own "
                                        "category. Change it to re-render the subject as something else."),
                io.Float.Input("prompt_strength", default=1.0, min=0.05, max=10.0, step=0.05,
                               tooltip="Multiplies prompt_reps (the published default 1.0)."),
                io.Int.Input("prompt_reps", default=20, min=1, max=100,
                             tooltip="How many times the prompt is repeated before truncation: the published "
                                     "trick to weigh the text against the subject (default 20)."),
            ],
            outputs=[io.Conditioning.Output(tooltip="Positive conditioning with the subject inside.")],
        )

    @classmethod
    def execute(cls, clip, subject, prompt, target_category, prompt_strength, prompt_reps) -> io.NodeOutput:
        width = host_clip.text_width(clip)  # refuses CLIPs other than SD 1.x first
        category = (target_category or "").strip() or subject.category
        if width != subject.width:
            raise ValueError(f"the subject is {subject.width} wide but the connected CLIP's embeddings are {width} "
                             "wide: connect the text encoder that belongs to the subject encoder's model.")
        layout = host_clip.prompt_layout(clip, prompt, category, prompt_strength, prompt_reps, subject.tokens)
        if layout.dropped_words:
            log.warning("SubjectConditioning: the prompt is longer than the %d tokens BLIP-Diffusion reads; "
                        "these words were dropped: %r", prompting.CONTEXT_LENGTH - subject.tokens - 2,
                        layout.dropped_words)
        cond, pooled = host_clip.encode_spliced(clip, layout, subject.embedding[0])
        return io.NodeOutput([[cond, {"pooled_output": pooled}]])


NODES = [SubjectConditioning]
