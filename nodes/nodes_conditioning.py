"""SubjectConditioning: a subject spliced into the host's own CLIP conditioning."""
import logging

from comfy_api.latest import io

from ..blip_core import prompting
from .types import SubjectType

log = logging.getLogger("blip_diffusion")


def sd1_tokenizer(clip):
    """The host's CLIP-L tokenizer of an SD 1.x CLIP, or a clear error for any other CLIP."""
    tok = getattr(clip, "tokenizer", None)
    if getattr(tok, "clip_name", None) == "l" and hasattr(tok, "clip_l"):
        return tok.clip_l
    encoders = sorted(k for k in vars(tok) if k.startswith("clip_") and k != "clip_name") if tok else []
    raise ValueError(
        "SubjectConditioning needs an SD 1.x CLIP (a single CLIP-L text encoder, 768 wide), as loaded by "
        "Load BLIP-Diffusion or by CLIPLoader with type 'stable_diffusion'; the connected CLIP "
        f"({type(tok).__name__}, encoders {encoders}) cannot take BLIP-Diffusion subjects (SD2, SDXL, SD3 and "
        "Flux CLIPs are not supported).")


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
        tok = sd1_tokenizer(clip)
        category = (target_category or "").strip() or subject.category
        width = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[1]
        if width != subject.width:
            raise ValueError(f"the subject is {subject.width} wide but the connected CLIP's embeddings are {width} "
                             "wide: connect the text encoder that belongs to the subject encoder's model.")
        hf = tok.tokenizer

        def encode(text):
            return hf(text, add_special_tokens=False)["input_ids"]

        layout = prompting.layout_tokens(encode, hf.decode, prompt, category, prompt_strength, prompt_reps,
                                         bos=tok.start_token, eos=tok.end_token, pad=tok.pad_token,
                                         subject_tokens=subject.tokens)
        if layout.dropped_words:
            log.warning("SubjectConditioning: the prompt is longer than the %d tokens BLIP-Diffusion reads; "
                        "these words were dropped: %r", prompting.CONTEXT_LENGTH - subject.tokens - 2,
                        layout.dropped_words)
        at = prompting.SUBJECT_BEGIN
        pairs = ([(t, 1.0) for t in layout.ids[:at]] + [(subject.embedding[0].float(), 1.0)]
                 + [(t, 1.0) for t in layout.ids[at:]])
        cond, pooled = clip.encode_from_tokens({"l": [pairs]}, return_pooled=True)
        return io.NodeOutput([[cond, {"pooled_output": pooled}]])


NODES = [SubjectConditioning]
