"""Reference: BLIP-Diffusion subject-driven editing, LAVIS ``BlipDiffusion.edit`` (DDIM inversion, then
``generate_then_edit`` with prompt-to-prompt AttentionRefine + LocalBlend), on diffusers' components.

This is a step-by-step transcription of LAVIS (lavis/models/blip_diffusion_models/blip_diffusion.py and
ptp_utils.py), not a redesign; the LAVIS function each part follows is named in its comment. LAVIS itself
cannot be installed here, so its algorithm is written out again.

args: model_dir, and either one case's fields or "cases": a list of them. A case has
      mode ("photo": LAVIS edit = invert a photo then edit; "generate": generate_then_edit from seeded
      noise with PNDM), photo (path; photo mode), size (512: the square the photo is resized+cropped to,
      and the height=width in generate mode), subject_image (path), cond_subject (category fed to the
      Q-Former), src_subject (the word naming what is in the photo), tgt_subject, prompt, neg_prompt (""),
      inversion_steps (50), steps (50), guidance (7.5), cross_replace (0.8), self_replace (0.4),
      threshold (0.3), seed (42), blend_words (words of the SOURCE prompt; default [src_subject]).
outputs per case i (suffix _i, none for a single case), float32:
      photo_latent (photo mode; 1x4xh/8xw/8, VAE posterior mean * 0.18215), inverted (photo mode),
      edited (2x4xhxw final latents, row 0 source/reconstruction, row 1 target/edit), mask (1x1xhxw, the
      last local-blend mask), mask_sum (ones in the mask after each blend step), image (2x3xHxW in 0..1),
      source_embeddings (1x77x768), target_embeddings (1x77x768), subject (1x16x768, the query embeddings),
      seconds (the case's wall time, pipeline built), peak_rss_mb (the process's peak RSS so far).

Deliberate departures from LAVIS (everything else follows it):
  * the photo latent is the VAE posterior mean (LAVIS samples with an unseeded generator);
  * the photo is resized to ``size`` (LAVIS always uses 512 and can only edit at 512);
  * the noise of generate mode comes from a CPU generator (LAVIS uses one on its device, CUDA there);
  * the attention layers are chosen by resolution, not by LAVIS's list indices (see ``layer_rules``);
  * the edit prompt is stripped (LAVIS's _build_prompts_edit does not strip; _build_prompt does);
  * the inversion prompt is "a {src_subject} {prompt}" (LAVIS's _ddim_inverse passes the src_subject string
    to _build_prompt, which zips it with the prompt list, so with a plain string it would use only its
    FIRST LETTER: "a d sitting ..." for "dog");
  * the UNet's own attention processors are put back after each case (LAVIS leaves its P2P processors
    installed, so a second LAVIS edit would run its inversion through a stale controller).
"""
import sys

import resource
import time

import numpy as np
from PIL import Image

from common import build_pipeline, io, resize_center_crop, run_cases

args, tensors, save = io()

import torch  # noqa: E402
import torch.nn.functional as nnf  # noqa: E402
from diffusers import DDIMScheduler, PNDMScheduler  # noqa: E402

LATENT_SCALE = 0.18215  # LAVIS hard-codes it (get_image_latents, _latent_to_image)


# ----------------------------------------------------------------------------------------------
# ptp_utils: token alignment (global_align, get_aligned_sequences, get_mapper, get_refinement_mapper),
# word indices (get_word_inds), time/word alphas (update_alpha_time_word, get_time_words_attention_alpha)
# ----------------------------------------------------------------------------------------------
GAP, MATCH, MISMATCH = 0, 1, -1  # ScoreParams(0, 1, -1)


def global_align(x, y):
    matrix = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    matrix[0, 1:] = (np.arange(len(y)) + 1) * GAP
    matrix[1:, 0] = (np.arange(len(x)) + 1) * GAP
    trace_back = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    trace_back[0, 1:] = 1
    trace_back[1:, 0] = 2
    trace_back[0, 0] = 4
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left = matrix[i, j - 1] + GAP
            up = matrix[i - 1, j] + GAP
            diag = matrix[i - 1, j - 1] + (MATCH if x[i - 1] == y[j - 1] else MISMATCH)
            matrix[i, j] = max(left, up, diag)
            # LAVIS's tie-breaking: left, then up, then diagonal.
            if matrix[i, j] == left:
                trace_back[i, j] = 1
            elif matrix[i, j] == up:
                trace_back[i, j] = 2
            else:
                trace_back[i, j] = 3
    return matrix, trace_back


def aligned_mapper(x, y, trace_back):
    """get_aligned_sequences' third output: for each y position (in order), (j, matched x index or -1)."""
    i, j = len(x), len(y)
    mapper_y_to_x = []
    while i > 0 or j > 0:
        if trace_back[i, j] == 3:
            i, j = i - 1, j - 1
            mapper_y_to_x.append((j, i))
        elif trace_back[i][j] == 1:
            j = j - 1
            mapper_y_to_x.append((j, -1))
        elif trace_back[i][j] == 2:
            i = i - 1
        elif trace_back[i][j] == 4:
            break
    mapper_y_to_x.reverse()
    return torch.tensor(mapper_y_to_x, dtype=torch.int64)


def get_mapper(x: str, y: str, tokenizer, max_len):
    x_seq = tokenizer.encode(x)
    y_seq = tokenizer.encode(y)
    _, trace_back = global_align(x_seq, y_seq)
    mapper_base = aligned_mapper(x_seq, y_seq, trace_back)
    alphas = torch.ones(max_len)
    alphas[: mapper_base.shape[0]] = mapper_base[:, 1].ne(-1).float()
    mapper = torch.zeros(max_len, dtype=torch.int64)
    mapper[: mapper_base.shape[0]] = mapper_base[:, 1]  # -1 (unmatched) stays -1: index -1, weight 0
    mapper[mapper_base.shape[0]:] = len(y_seq) + torch.arange(max_len - len(y_seq))
    return mapper, alphas


def get_refinement_mapper(prompts, tokenizer, max_len):
    mappers, alphas = [], []
    for i in range(1, len(prompts)):
        mapper, alpha = get_mapper(prompts[0], prompts[i], tokenizer, max_len)
        mappers.append(mapper)
        alphas.append(alpha)
    return torch.stack(mappers), torch.stack(alphas)


def get_word_inds(text: str, word: str, tokenizer):
    split_text = text.split(" ")
    word_place = [i for i, w in enumerate(split_text) if word == w]
    out = []
    if len(word_place) > 0:
        words_encode = [tokenizer.decode([item]).strip("#") for item in tokenizer.encode(text)][1:-1]
        cur_len, ptr = 0, 0
        for i in range(len(words_encode)):
            cur_len += len(words_encode[i])
            if ptr in word_place:
                out.append(i + 1)
            if cur_len >= len(split_text[ptr]):
                ptr += 1
                cur_len = 0
    return np.array(out, dtype=np.int64)


def get_time_words_attention_alpha(n_prompts, num_steps, cross_replace_steps: float, max_num_words):
    """Only the float (no per-word dict) form LAVIS uses: bounds (0, cross_replace_steps)."""
    alpha = torch.zeros(num_steps + 1, n_prompts - 1, max_num_words)
    start, end = int(0.0 * alpha.shape[0]), int(cross_replace_steps * alpha.shape[0])
    for i in range(n_prompts - 1):
        alpha[:start, i, :] = 0
        alpha[start:end, i, :] = 1
        alpha[end:, i, :] = 0
    return alpha.reshape(num_steps + 1, n_prompts - 1, 1, 1, max_num_words)


# ----------------------------------------------------------------------------------------------
# ptp_utils: AttentionControl / AttentionStore / AttentionControlEdit / AttentionRefine / LocalBlend
# ----------------------------------------------------------------------------------------------
def layer_rules(latent_h, latent_w):
    """Which layers LAVIS's hard-coded choices mean, stated by resolution relative to the latent.

    LAVIS (512 px, SD1.5 UNet with two/three layers per block) blends with
    attention_store["down_cross"][2:4] + ["up_cross"][:3], reshaped to 16x16, and replaces self-attention
    where the query length is <= 16**2. Those are the 16x16 maps of a 64x64 latent, i.e. query length
    n // 16 with n = latent_h * latent_w. So here: blend layers = DOWN and UP (not mid) cross-attention
    layers with query length == n // 16, in UNet call order, on a (latent_h // 4, latent_w // 4) grid;
    self-replace layers = self-attention layers with query length <= n // 16. At 512 px with the released
    UNet this selects exactly LAVIS's layers (down_blocks.2's two, up_blocks.1's three; self: down_blocks.2,
    mid, up_blocks.1), and it keeps meaning the same thing for other sizes and for one-layer-per-block UNets.
    """
    n = latent_h * latent_w
    return n // 16, (latent_h // 4, latent_w // 4)


class AttentionRefineController:
    """AttentionRefine(AttentionControlEdit(AttentionStore(AttentionControl))) + LocalBlend, batch 2."""

    def __init__(self, prompts, num_steps, cross_replace_steps, self_replace_steps, tokenizer, blend_words,
                 threshold, num_att_layers, latent_hw, max_num_words):
        self.batch_size = len(prompts)  # 2: source, target
        self.L = max_num_words
        # AttentionControl
        self.cur_step = 0
        self.cur_att_layer = 0
        self.num_att_layers = num_att_layers
        # AttentionStore: summed conditional probabilities of the blend layers, keyed by layer name
        self.attention_store = {}
        self.blend_layers = []  # names, in call order (filled during the first UNet call)
        self.self_replace_layers = []  # names of the self-attention layers small enough to be replaced
        # AttentionControlEdit
        self.cross_replace_alpha = get_time_words_attention_alpha(len(prompts), num_steps, cross_replace_steps,
                                                                  max_num_words)
        self_replace_steps = (0.0, self_replace_steps)
        self.num_self_replace = int(num_steps * self_replace_steps[0]), int(num_steps * self_replace_steps[1])
        # AttentionRefine
        self.mapper, alphas = get_refinement_mapper(prompts, tokenizer, max_num_words)
        self.alphas = alphas.reshape(alphas.shape[0], 1, 1, alphas.shape[1])
        # LocalBlend: zip(prompts, words) with words = (src_subject,) -> only the SOURCE row gets indices.
        alpha_layers = torch.zeros(len(prompts), 1, 1, 1, 1, max_num_words)
        for i, (prompt, words_) in enumerate(zip(prompts, (blend_words,))):
            for word in words_:
                ind = get_word_inds(prompt, word, tokenizer)
                alpha_layers[i, :, :, :, :, ind] = 1
        self.alpha_layers = alpha_layers
        self.threshold = threshold
        self.latent_hw = latent_hw
        self.small_q, self.blend_grid = layer_rules(*latent_hw)
        self.mask = None
        self.mask_sums = []

    # AttentionControl.__call__: act on the conditional half of the batch (rows src-cond, tgt-cond).
    def __call__(self, attn, is_cross, place_in_unet, name):
        h = attn.shape[0]
        attn[h // 2:] = self.forward(attn[h // 2:], is_cross, place_in_unet, name)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
        return attn

    # AttentionControlEdit.forward (+ AttentionStore.forward for the blend layers)
    def forward(self, attn, is_cross, place_in_unet, name):
        q = attn.shape[1]
        if is_cross or (self.num_self_replace[0] <= self.cur_step < self.num_self_replace[1]):
            heads = attn.shape[0] // self.batch_size
            attn = attn.reshape(self.batch_size, heads, *attn.shape[1:])
            attn_base, attn_replace = attn[0], attn[1:]
            if is_cross:
                alpha_words = self.cross_replace_alpha[self.cur_step]
                attn_replace_new = self.replace_cross_attention(attn_base, attn_replace) * alpha_words \
                    + (1 - alpha_words) * attn_replace
                attn[1:] = attn_replace_new
            elif q <= self.small_q:  # replace_self_attention (LAVIS: <= 16 ** 2)
                if self.cur_step == self.num_self_replace[0]:
                    self.self_replace_layers.append(name)
                attn[1:] = attn_base.unsqueeze(0).expand(attn_replace.shape[0], *attn_base.shape)
            attn = attn.reshape(self.batch_size * heads, *attn.shape[2:])
        # LAVIS stores a view of these probabilities before editing them in place, so the store sees the
        # edited values; storing after the edit is the same thing.
        if is_cross and place_in_unet in ("down", "up") and q == self.small_q:
            if self.cur_step == 0:
                self.blend_layers.append(name)
                self.attention_store[name] = attn.clone()
            else:
                self.attention_store[name] = self.attention_store[name] + attn
        return attn

    # AttentionRefine.replace_cross_attention
    def replace_cross_attention(self, attn_base, att_replace):
        attn_base_replace = attn_base[:, :, self.mapper].permute(2, 0, 1, 3)
        return attn_base_replace * self.alphas + att_replace * (1 - self.alphas)

    # AttentionControlEdit.step_callback -> LocalBlend.__call__
    def step_callback(self, x_t):
        k = 1
        hb, wb = self.blend_grid
        maps = [self.attention_store[name] for name in self.blend_layers]
        maps = [item.reshape(self.alpha_layers.shape[0], -1, 1, hb, wb, self.L) for item in maps]
        maps = torch.cat(maps, dim=1)
        maps = (maps * self.alpha_layers).sum(-1).mean(1)
        mask = nnf.max_pool2d(maps, (k * 2 + 1, k * 2 + 1), (1, 1), padding=(k, k))
        mask = nnf.interpolate(mask, size=(x_t.shape[2:]))
        mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]  # target row: 0/0 = NaN
        mask = mask.gt(self.threshold)  # NaN > t is False
        mask = (mask[:1] + mask[1:]).float()
        x_t = x_t[:1] + mask * (x_t - x_t[:1])
        self.mask = mask
        self.mask_sums.append(mask.sum())
        return x_t


class P2PCrossAttnProcessor:
    """ptp_utils.P2PCrossAttnProcessor: explicit scores + softmax, controller edits probs in place."""

    def __init__(self, controller, place_in_unet, name):
        self.controller = controller
        self.place_in_unet = place_in_unet
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        # What LAVIS's processor leaves out must be absent (true for SD1.5's transformer attentions).
        assert hidden_states.ndim == 3 and attn.spatial_norm is None and attn.group_norm is None
        assert not attn.norm_cross and not attn.residual_connection and attn.rescale_output_factor == 1.0
        batch_size, sequence_length, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size=batch_size)

        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        encoder_hidden_states = encoder_hidden_states if encoder_hidden_states is not None else hidden_states
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        attention_probs = attn.get_attention_scores(query, key, attention_mask)
        self.controller(attention_probs, is_cross, self.place_in_unet, self.name)

        hidden_states = torch.bmm(attention_probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def register_attention_control(unet, controller):
    """BlipDiffusion._register_attention_control: every attention processor in down/mid/up."""
    attn_procs = {}
    count = 0
    for name in unet.attn_processors.keys():
        if name.startswith("mid_block"):
            place = "mid"
        elif name.startswith("up_blocks"):
            place = "up"
        elif name.startswith("down_blocks"):
            place = "down"
        else:
            continue
        count += 1
        attn_procs[name] = P2PCrossAttnProcessor(controller, place, name)
    assert len(attn_procs) == len(unet.attn_processors), "attention processors outside down/mid/up"
    unet.set_attn_processor(attn_procs)
    return count


# ----------------------------------------------------------------------------------------------
# blip_diffusion.py
# ----------------------------------------------------------------------------------------------
def ddim_scheduler():
    """DDIMScheduler.from_config("runwayml/stable-diffusion-v1-5", subfolder="scheduler"), offline."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", trained_betas=None, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                         timestep_spacing="leading")


def pndm_scheduler():
    """BlipDiffusion.pndm_scheduler (steps_offset left at its default, 0)."""
    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         set_alpha_to_one=False, skip_prk_steps=True)


def inversion_transform(image, size):
    """BlipDiffusion._inversion_transform (target_size=512 there): torchvision's
    Compose([Resize(size), CenterCrop(size), ToTensor()]) on a PIL image, then 2x-1. torchvision is not in
    the reference environment, so its PIL path is written out (torchvision.transforms.functional):
    resize: shorter edge -> size, longer -> int(size * long / short), PIL bilinear (untouched if already
    that size); center_crop: top/left = int(round((dim - size) / 2.0)); to_tensor: uint8 HWC -> CHW / 255."""
    image = resize_center_crop(image, size, Image.BILINEAR)
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous().float().div(255)
    return 2.0 * x.unsqueeze(0) - 1.0


def backward_ddim(x_t, alpha_t, alpha_tm1, eps_xt):
    """_noise_latent_step.backward_ddim, as written."""
    return (
        alpha_tm1**0.5
        * (
            (alpha_t**-0.5 - alpha_tm1**-0.5) * x_t
            + ((1 / alpha_tm1 - 1) ** 0.5 - (1 / alpha_t - 1) ** 0.5) * eps_xt
        )
        + x_t
    )


def tokenize(pipe, texts, max_len):
    """BlipDiffusion._tokenize_text."""
    return pipe.tokenizer(texts, padding="max_length", truncation=True, max_length=max_len,
                          return_tensors="pt").input_ids


def ddim_inverse(pipe, latents, src_subject, prompt, num_steps, max_len):
    """BlipDiffusion._ddim_inverse + _noise_latent_step, guidance_scale=1.0 (one UNet call, no CFG)."""
    text = [f"a {src_subject} {prompt.strip()}"]  # _build_prompt(prompt_strength=1.0, prompt_reps=1)
    text_embeddings = pipe.text_encoder(input_ids=tokenize(pipe, text, max_len), ctx_embeddings=None)[0]
    scheduler = ddim_scheduler()
    scheduler.set_timesteps(num_steps)
    for t in reversed(scheduler.timesteps):
        noise_pred = pipe.unet(latents, timestep=t, encoder_hidden_states=text_embeddings,
                               down_block_additional_residuals=None, mid_block_additional_residual=None)["sample"]
        prev_timestep = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        alpha_prod_t = scheduler.alphas_cumprod[t]
        alpha_prod_t_prev = (scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0
                             else scheduler.final_alpha_cumprod)
        alpha_prod_t, alpha_prod_t_prev = alpha_prod_t_prev, alpha_prod_t
        latents = backward_ddim(x_t=latents, alpha_t=alpha_prod_t, alpha_tm1=alpha_prod_t_prev, eps_xt=noise_pred)
    return latents


def run(case):
    pipe = PIPE
    unet, tokenizer = pipe.unet, pipe.tokenizer
    mode = case["mode"]
    assert mode in ("photo", "generate"), mode
    size = int(case.get("size", 512))
    guidance = float(case.get("guidance", 7.5))
    assert guidance > 1.0, "LAVIS's edit path indexes a 4-row CFG batch; it needs guidance > 1"
    steps = int(case.get("steps", 50))
    src_subject, tgt_subject = case["src_subject"], case["tgt_subject"]
    prompt = case["prompt"].strip()
    blend_words = case.get("blend_words") or [src_subject]
    blend_words = [blend_words] if isinstance(blend_words, str) else list(blend_words)  # LocalBlend.__init__
    max_len = pipe.text_encoder.text_model.config.max_position_embeddings  # 77
    num_query = pipe.qformer.config.num_query_tokens  # 16
    ctx_begin_pos = pipe.config.ctx_begin_pos  # LAVIS _CTX_BEGIN_POS = 2
    out = {}

    # edit(): photo -> latent -> DDIM inversion (with the UNet's own attention processors).
    if mode == "photo":
        raw = inversion_transform(Image.open(case["photo"]).convert("RGB"), size)
        # The host hands its VAE an image batch (B, H, W, C) moved to channels-first, so the same memory
        # layout here: CPU convolutions round differently on a contiguous tensor (~1e-3 in the latent on
        # the generated weights), which the steps after would amplify into a false mismatch.
        raw = raw.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        photo_latent = pipe.vae.encode(raw).latent_dist.mean * LATENT_SCALE
        inverted = ddim_inverse(pipe, photo_latent, src_subject, prompt, int(case.get("inversion_steps", 50)),
                                max_len)
        out.update(photo_latent=photo_latent, inverted=inverted)
        latent_hw = tuple(inverted.shape[2:])
    else:
        latent_hw = (size // 8, size // 8)

    # generate_then_edit()
    placeholder = " ".join(["sks"] * num_query)
    prompts = [f"a {src_subject} {prompt}", f"a {placeholder} {tgt_subject} {prompt}"]  # _build_prompts_edit
    controller = AttentionRefineController(
        prompts, steps, float(case.get("cross_replace", 0.8)), float(case.get("self_replace", 0.4)),
        tokenizer, blend_words, float(case.get("threshold", 0.3)), num_att_layers=0, latent_hw=latent_hw,
        max_num_words=max_len)
    controller.num_att_layers = register_attention_control(unet, controller)

    reference = pipe.image_processor.preprocess(
        Image.open(case["subject_image"]).convert("RGB"), image_mean=pipe.config.mean,
        image_std=pipe.config.std, return_tensors="pt")["pixel_values"]
    query_embeds = pipe.get_query_embeddings(reference, [case["cond_subject"]])

    text_embeddings_bef = pipe.text_encoder(input_ids=tokenize(pipe, prompts[:1], max_len))[0]
    text_embeddings_aft = pipe.text_encoder(input_ids=tokenize(pipe, prompts[1:], max_len - num_query),
                                            ctx_embeddings=query_embeds, ctx_begin_pos=[ctx_begin_pos])[0]
    out.update(source_embeddings=text_embeddings_bef, target_embeddings=text_embeddings_aft, subject=query_embeds)
    text_embeddings = torch.cat([text_embeddings_bef, text_embeddings_aft], dim=0)

    batch_size = 2
    uncond_input = tokenizer([case.get("neg_prompt", "")], padding="max_length", max_length=max_len,
                             return_tensors="pt")
    uncond_embeddings = pipe.text_encoder(input_ids=uncond_input.input_ids, ctx_embeddings=None)[0]
    uncond_embeddings = uncond_embeddings.expand(batch_size, -1, -1)
    text_embeddings = torch.cat([uncond_embeddings, text_embeddings])  # [uncond, uncond, src, tgt]

    use_inversion = mode == "photo"
    if use_inversion:
        latents = out["inverted"]
    else:
        generator = torch.Generator().manual_seed(int(case.get("seed", 42)))
        latents = torch.randn((1, unet.config.in_channels, size // 8, size // 8), generator=generator)
    latents = latents.expand(batch_size, unet.config.in_channels, *latent_hw)  # _init_latent

    scheduler = ddim_scheduler() if use_inversion else pndm_scheduler()
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        # _denoise_latent_step
        call = controller.cur_step
        latent_model_input = torch.cat([latents] * 2)
        noise_pred = unet(latent_model_input, timestep=t, encoder_hidden_states=text_embeddings,
                          down_block_additional_residuals=None, mid_block_additional_residual=None)["sample"]
        assert controller.cur_step == call + 1 and controller.cur_att_layer == 0
        if use_inversion:
            noise_placeholder = [noise_pred[2].unsqueeze(0)]  # source branch, conditional, unguided
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
        if use_inversion:
            noise_placeholder.append(noise_pred[-1].unsqueeze(0))  # target branch, guided
            noise_pred = torch.cat(noise_placeholder)
        latents = scheduler.step(noise_pred, t, latents)["prev_sample"]
        latents = controller.step_callback(latents)

    image = pipe.vae.decode(latents / LATENT_SCALE).sample
    image = (image / 2 + 0.5).clamp(0, 1)
    unet.set_attn_processor(dict(ORIGINAL_PROCESSORS))  # (it pops from the dict)
    print(f"edit.py: blend layers {controller.blend_layers}; self-replace layers "
          f"{controller.self_replace_layers}", file=sys.stderr)
    out.update(edited=latents, mask=controller.mask, mask_sum=torch.stack(controller.mask_sums), image=image)
    return out


def timed(case):
    """run() with its wall time (pipeline already built) and the process's peak RSS so far, for bench/."""
    start = time.perf_counter()
    out = run(case)
    out["seconds"] = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    out["peak_rss_mb"] = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    return out


PIPE = build_pipeline(args["model_dir"])
ORIGINAL_PROCESSORS = dict(PIPE.unet.attn_processors)
with torch.no_grad():
    save(run_cases(args["cases"], timed) if "cases" in args else timed(args))
