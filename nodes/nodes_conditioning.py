"""SubjectConditioning: a subject spliced into the host's own CLIP conditioning."""
import logging

from comfy_api.latest import io

from ..blip_core import prompting
from ..blip_core import subject_strength as strength
from . import host_clip
from .types import SubjectType

log = logging.getLogger("blip_diffusion")


def encode_subject_prompt(clip, subject, prompt: str, category: str, prompt_strength: float = 1.0,
                          prompt_reps: int = 20, node: str = "SubjectConditioning", label: str = "the subject"):
    """The published subject prompt encoded by the host CLIP: (layout, cond, pooled). Refuses a CLIP of
    another width; words cut by the window are named in the server log."""
    width = host_clip.text_width(clip)  # refuses CLIPs other than SD 1.x first
    if width != subject.width:
        raise ValueError(f"{label} is {subject.width} wide but the connected CLIP's embeddings are {width} "
                         "wide: connect the text encoder that belongs to the subject encoder's model.")
    layout = host_clip.prompt_layout(clip, prompt, category, prompt_strength, prompt_reps, subject.tokens)
    if layout.dropped_words:
        log.warning("%s: the prompt is longer than the %d tokens BLIP-Diffusion reads with %s; these words were "
                    "dropped: %r", node, prompting.CONTEXT_LENGTH - subject.tokens - 2, label, layout.dropped_words)
    cond, pooled = host_clip.encode_spliced(clip, layout, subject.embedding[0])
    return layout, cond, pooled


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
                "any sampler as the positive conditioning; use an ordinary CLIPTextEncode for the negative. "
                "subject_strength and subject_end loosen the subject's hold (1 and 1: as published)."),
            inputs=[
                io.Clip.Input("clip", tooltip="The BLIP-Diffusion text encoder (an SD 1.x CLIP-L)."),
                SubjectType.Input("subject", tooltip="The subject from SubjectEncode, SubjectInterpolate or "
                                                      "LoadSubject."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What to render the subject doing or where, e.g. 'on a beach at "
                                        "sunset'. The category is prepended for you. Read as plain text, as the "
                                        "published pipeline reads it: ComfyUI's (word:1.2) weights and embedding: "
                                        "names are not applied."),
                io.String.Input("target_category", default="",
                                tooltip="The category word used in the prompt; empty uses the subject's own "
                                        "category. Change it to re-render the subject as something else."),
                io.Float.Input("prompt_strength", default=1.0, min=0.05, max=10.0, step=0.05,
                               tooltip="Multiplies prompt_reps (the published default 1.0)."),
                io.Int.Input("prompt_reps", default=20, min=1, max=100,
                             tooltip="How many times the prompt is repeated before truncation: the published "
                                     "trick to weigh the text against the subject (default 20)."),
                io.Float.Input("subject_strength", default=strength.PUBLISHED_STRENGTH, min=0.0,
                               max=strength.MAX_STRENGTH, step=0.05, optional=True,
                               tooltip="How strongly the subject shapes the picture. 1: as published. Lower "
                                       "blends toward the same prompt without the subject; 0: the text alone "
                                       "(the subject is ignored). Above 1 pushes further away from the text "
                                       "than published (an extrapolation; go in small steps)."),
                io.Float.Input("subject_end", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="How much of the sampling uses the subject, from the start: 1: all of it "
                                       "(as published); 0.5: the first half of the noise schedule (layout and "
                                       "identity), then the prompt without the subject refines the rest; 0: "
                                       "never. The host's timestep ranges, as ConditioningSetTimestepRange."),
            ],
            outputs=[io.Conditioning.Output(tooltip="Positive conditioning with the subject inside.")],
        )

    @classmethod
    def execute(cls, clip, subject, prompt, target_category, prompt_strength, prompt_reps,
                subject_strength=strength.PUBLISHED_STRENGTH, subject_end=1.0) -> io.NodeOutput:
        category = (target_category or "").strip() or subject.category
        layout, cond, pooled = encode_subject_prompt(clip, subject, prompt, category, prompt_strength, prompt_reps)
        if subject_strength == strength.PUBLISHED_STRENGTH and subject_end >= 1.0:
            return io.NodeOutput([[cond, {"pooled_output": pooled}]])  # the published conditioning, untouched
        free, free_pooled = host_clip.encode_subject_free(clip, layout, subject.tokens)
        free = strength.align_free(free, prompting.SUBJECT_BEGIN, subject.tokens)
        mixed = [strength.blend(cond, free, subject_strength),
                 {"pooled_output": strength.blend(pooled, free_pooled, subject_strength)}]
        return io.NodeOutput(strength.scheduled(mixed, [free, {"pooled_output": free_pooled}], subject_end))


NODES = [SubjectConditioning]
