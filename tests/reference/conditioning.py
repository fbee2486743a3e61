"""Reference: the text conditioning BlipDiffusionPipeline builds for given subject vectors.

args: model_dir, prompts (list), category, strength, reps; inputs: ctx (1,16,768)
outputs: cond_<i> (1,77,768) per prompt, uncond (1,77,768) for the empty negative prompt.
"""
from common import build_pipeline, io

args, tensors, save = io()
import torch  # noqa: E402

pipe = build_pipeline(args["model_dir"])
out = {}
with torch.no_grad():
    for i, prompt in enumerate(args["prompts"]):
        text = pipe._build_prompt([prompt], [args["category"]], args.get("strength", 1.0), args.get("reps", 20))
        out[f"cond_{i}"] = pipe.encode_prompt(tensors["ctx"], text, "cpu")
    neg = pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt")
    out["uncond"] = pipe.text_encoder(input_ids=neg.input_ids, ctx_embeddings=None)[0]
save(out)
