"""BLIP-Diffusion model and algorithms: plain torch, no ComfyUI imports."""
