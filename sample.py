"""
Draw images from a Stable Diffusion 1.5 or SDXL pipeline (DDIM or Euler ancestral), optionally with a
MagiCapture training result applied.

    python sample.py                                   # the tiny random pipeline, on any machine
    python sample.py --init_from=stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt="a photo of an astronaut"
    python sample.py --init_from=stabilityai/stable-diffusion-xl-base-1.0 --variant=fp16 --prompt="an astronaut"
    python sample.py config/sample_sd15.py --lora=out/magicapture --prompt="a photo of <v1> person in the <v2> style"
    python sample.py ... --lora=out/magicapture --attention      # where <v1> and <v2> attend (paper Fig. 3)
    python sample.py ... --postprocess                           # + Real-ESRGAN and CodeFormer (postprocess.py)

Writes one PNG per image (named by its seed, so any image can be drawn again alone)
and a grid.png, into out_dir.
"""

import glob
import json
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from configurator import check_choice, check_device, configure
from data import grid, save_png, to_uint8, write_whole
from lora import load_result, lora_modules, merge
from model import DTYPES, AttentionRecorder, StableDiffusion

# -----------------------------------------------------------------------------
init_from = "tiny"        # a Hub repo id, a diffusers-layout folder (SD1.5 or SDXL), "tiny" or "tiny-xl"
variant = None            # "fp16" downloads the half-size weight files
prompt = "a photo of a person"
negative_prompt = ""
sampler = "ddim"          # "ddim" or "euler_a" (Euler ancestral, the official MagiCapture inference)
steps = 50
guidance = 7.5            # classifier-free guidance scale
eta = 0.0                 # DDIM only: 0 = deterministic
seed = 0                  # image i uses seed + i
num_samples = 4
batch_size = 4
height = None             # None: the model's native size (512 for SD1.5, 1024 for SDXL, 128 for the tiny ones)
width = None
lora = ""                 # a training result: train.py's out_dir, or its .safetensors files; its tokens are added
lora_scale = 1.0          # strength of the LoRA (official inference: 0.6)
lora_scale_text = None    # the text encoder LoRA's own strength, if it has one (official inference: 0.9)
attention = False         # also save each placeholder token's cross-attention heat map
postprocess = False       # also save an enhanced copy: super-resolution, then face restoration
upscale_factor = 2        # of the enhanced copy (the official inference: CodeFormer with 2x upscale)
restore_weight = 0.5      # CodeFormer fidelity: smaller restores more, larger keeps more (official: 0.5)
upsampler = "real_esrgan" # the enlargement: Real-ESRGAN, then faces restored (the paper's), or "bilinear": faces
                          # restored at the drawn size, pasted into a bilinear enlargement (the official script's)
restore_parse = False     # blend restored faces through a face-parsing mask: hair, neck stay (official: True)
upscaler_model = ""       # "" takes the file from the Hub repo facefusion/models-3.0.0; or a local .onnx
restorer_model = ""
detector_model = ""
parser_model = ""
out_dir = "out/samples"
overwrite = False         # replace the images of an earlier call in out_dir (else an out_dir holding some is refused)
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "fp16" if torch.cuda.is_available() else "fp32"   # fp32, bf16 or fp16
# -----------------------------------------------------------------------------
config = configure(globals())
# settings with a fixed set of values, checked before any model loads
check_choice("dtype", dtype, DTYPES)
check_choice("sampler", sampler, ("ddim", "euler_a"))
check_device(device)
if attention and not lora:
    raise SystemExit("--attention shows where the learned tokens attend: give a training result with --lora=DIR")
if not (steps >= 1 and num_samples >= 1 and batch_size >= 1):
    raise SystemExit(f"steps, num_samples and batch_size must be >= 1, got {steps}, {num_samples} and {batch_size}")
for name, side in (("height", height), ("width", width)):
    if side is not None and not (isinstance(side, int) and side >= 8 and side % 8 == 0):
        raise SystemExit(f"{name} must be None (the model's size) or a multiple of 8 pixels, got {side!r}")
if not 0 <= seed < 2 ** 63 - num_samples:  # torch.Generator's seeds
    raise SystemExit(f"seed must be in [0, 2^63 - num_samples), got {seed}")
if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise SystemExit(f"out_dir {out_dir} is a file: pick a folder (--out_dir=...)")
earlier = [os.path.join(out_dir, n) for n in ("sample.json", "grid.png") if os.path.exists(os.path.join(out_dir, n))]
earlier += sorted(glob.glob(os.path.join(glob.escape(out_dir), "seed*.png")))
if earlier and not overwrite:  # their images would be mixed with these, and sample.json would describe only these
    raise SystemExit(f"{out_dir} holds the images of an earlier call ({len(earlier)} files); pick another "
                     "--out_dir, or replace them with --overwrite")
enhancers = {}
if postprocess:  # found now, not after the first images are drawn
    from postprocess import find_models
    enhancers = find_models(upscale_factor, True, upscaler_model or None, restorer_model or None,
                            detector_model or None, restore_parse, parser_model or None, upsampler, restore_weight)
run_folder = (lora if os.path.isdir(lora) else os.path.dirname(lora)) if lora else None
run_config = {}
if run_folder and os.path.isfile(os.path.join(run_folder, "config.json")):
    with open(os.path.join(run_folder, "config.json")) as f:
        run_config = json.load(f)
if run_config.get("init_from") not in (None, init_from):  # a LoRA may be meant for a related model: warn only
    print(f"warning: {run_folder} was trained on {run_config['init_from']}, and this draws with {init_from} "
          f"(--init_from={run_config['init_from']} draws with the model it was trained on)")
pipeline = os.path.join(run_folder, "pipeline") if run_folder else None  # a DreamBooth run's whole model
if pipeline and os.path.isdir(pipeline) and os.path.normpath(init_from) != os.path.normpath(pipeline):
    print(f"warning: {run_folder} fine-tuned the whole model: --init_from={pipeline} draws with it")

def heatmaps(rec, n_uncond, size):
    """Average each token's recorded maps over steps, layers and heads -> (B, K, H, W) in [0, 1]."""
    maps = [F.interpolate(m[n_uncond:].float().mean(1).permute(0, 3, 1, 2), size=size, mode="bilinear")
            for m in rec.maps]  # conditional half only: (B, K, H, W) each
    a = torch.stack(maps).mean(0)
    lo, hi = a.amin(dim=(-2, -1), keepdim=True), a.amax(dim=(-2, -1), keepdim=True)
    return (a - lo) / (hi - lo).clamp_min(1e-8)

def overlay(image, heat):
    """Blend a jet-coloured heat map (H, W) over an image (3, H, W)."""
    import matplotlib
    colour = torch.from_numpy(matplotlib.colormaps["jet"](heat.numpy())[..., :3]).permute(2, 0, 1).float()
    return 0.5 * image + 0.5 * colour

def save_enhanced(image, stem):
    """<stem>_enhanced.png, and <stem>_compare.png: the plain image (enlarged, nearest) beside the enhanced one."""
    from postprocess import enhance
    plain = to_uint8(image)
    better = enhance(plain, upscale_factor, restore=True, weight=restore_weight, upscaler=enhancers.get("upscaler"),
                     restorer=enhancers.get("restorer"), detector=enhancers.get("detector"), parse=restore_parse,
                     parser=enhancers.get("parser"), upsampler=upsampler)
    Image.fromarray(better).save(stem + "_enhanced.png")
    before = np.asarray(Image.fromarray(plain).resize(better.shape[1::-1], Image.NEAREST))
    Image.fromarray(np.concatenate([before, better], axis=1)).save(stem + "_compare.png")

# -----------------------------------------------------------------------------
try:
    sd = StableDiffusion.from_pretrained(init_from, device=device, dtype=DTYPES[dtype], variant=variant)
except (FileNotFoundError, RuntimeError, ValueError) as e:  # not found, not fetched, not a pipeline model.py reads
    raise SystemExit(str(e))
tokens, attn_res = [], None
if lora:
    try:
        tokens = load_result(sd, lora, scale=lora_scale, text_scale=lora_scale_text)
    except (FileNotFoundError, ValueError) as e:
        trained_on = f" (it was trained on {run_config['init_from']})" if "init_from" in run_config else ""
        raise SystemExit(f"--lora={lora}{trained_on}: {e}")
    if lora_scale_text is not None and not any(lora_modules(m) for m in (sd.text_encoder, sd.text_encoder_2) if m):
        print(f"warning: {lora} trained no text-encoder LoRA: --lora_scale_text={lora_scale_text} has nothing to "
              "scale (its tokens are used as trained)")
    # the LoRA's scale is now fixed: fold it into the base weights, so sampling needs no extra matmuls
    merge(sd.unet, sd.text_encoder, sd.text_encoder_2)
    print(f"applied {lora} (LoRA scale {lora_scale}); its tokens: {' '.join(tokens)}")
H = height or sd.vae.config.sample_size
W = width or sd.vae.config.sample_size
if attention:
    if "attn_resolutions" not in run_config:
        raise SystemExit(f"--attention records the maps the run's attention loss shaped (attn_resolutions in "
                         f"train.py's config.json), but {os.path.join(run_folder, 'config.json')} is missing")
    attn_res = run_config["attn_resolutions"]
    sides = sorted(set(sd.unet.cross_attention_sides(H // 8) + sd.unet.cross_attention_sides(W // 8)), reverse=True)
    if not set(attn_res) & set(sides):
        raise SystemExit(f"--attention: at {W}x{H} no cross-attention map is {attn_res} on a side (the run's "
                         f"attn_resolutions), the maps are {sides}: draw at the run's resolution "
                         f"({run_config.get('resolution')})")
# the run's, and those the base model has; in lower case, as the tokenizer reads the prompt (<V1> is <v1>)
known = {t.lower() for t in tokens} | {d["content"].lower() for d in sd.tokenizer.extra}
unknown = sorted({t for t in re.findall(r"<[^<>\s]+>", prompt) if t.lower() not in known})
if unknown:
    print(f"warning: {' '.join(unknown)} in the prompt: not a learned token ({' '.join(tokens) or 'no --lora given'});"
          " CLIP reads it as plain text")
if tokens and not any(t.lower() in prompt.lower() for t in tokens):
    print(f"warning: the prompt uses none of the learned tokens ({' '.join(tokens)}): the images show the LoRA's "
          "effect alone")
try:  # CLIP reads 77 tokens: a placeholder past them would be dropped, and its --attention panel blank
    sd.tokenizer.check_length([prompt, negative_prompt])
except ValueError as e:
    raise SystemExit(str(e))
if sampler == "ddim":
    try:
        sd.schedule.ddim_timesteps(steps)
    except ValueError as e:
        raise SystemExit(f"--steps={steps}: {e}")
for path in earlier:  # --overwrite: the earlier call's images go, so none is mixed with these
    os.remove(path)
os.makedirs(out_dir, exist_ok=True)
record = os.path.join(out_dir, "sample.json")  # first: the images a stop leaves keep their settings
write_whole(record, json.dumps(dict(config, height=H, width=W), indent=2))
seeds = [seed + i for i in range(num_samples)]
images, saved = [], 0
try:
    for b in range(0, num_samples, batch_size):
        chunk = seeds[b:b + batch_size]
        # one generator per image: image i is the same whatever the batch size
        latents = torch.cat([torch.randn(1, sd.vae.config.latent_channels, H // 8, W // 8,
                                         generator=torch.Generator().manual_seed(s)) for s in chunk])
        print(f"images {b + 1}-{b + len(chunk)} of {num_samples}")
        prompts, negatives = [prompt] * len(chunk), [negative_prompt] * len(chunk)
        rec = None
        if attention:  # the UNet sees [negatives; prompts]: record for that batch, keep the prompts' half
            ids = sd.tokenizer(negatives + prompts).to(sd.device)
            rec = AttentionRecorder(ids, [sd.tokenizer.tok.token_to_id(t) for t in tokens], attn_res)
        with sd.unet.record_attention(rec):
            out = sd.sample(prompts, negative_prompt=negatives, steps=steps, guidance=guidance, eta=eta,
                            seed=chunk, latents=latents, height=H, width=W, progress=True, sampler=sampler).cpu()
        for s, im in zip(chunk, out):
            save_png(im, os.path.join(out_dir, f"seed{s}.png"))
            saved += 1
            if postprocess:
                save_enhanced(im, os.path.join(out_dir, f"seed{s}"))
        images.append(out)
        if rec is not None:
            heat = heatmaps(rec, len(chunk), (H, W)).cpu()
            for s, im, hm in zip(chunk, out, heat):
                row = torch.cat([im] + [overlay(im, h) for h in hm], dim=2)  # image | <v1> | <v2>
                save_png(row, os.path.join(out_dir, f"seed{s}_attention.png"))
except BaseException as e:  # Ctrl-C, out of memory, ...
    if not saved:  # no image: no record either, so the same command can run again
        os.remove(record)
    if not isinstance(e, KeyboardInterrupt):
        raise
    print(f"\nstopped: {saved} of {num_samples} images drawn in {out_dir}, their settings in "
          "sample.json (no grid.png)", file=sys.stderr)
    sys.exit(130)
save_png(grid(torch.cat(images)), os.path.join(out_dir, "grid.png"))
extra = f", seed<N>_attention.png (image | {' | '.join(tokens)})" if attention else ""
extra += ", seed<N>_enhanced.png and seed<N>_compare.png (before | after)" if postprocess else ""
print(f"wrote {num_samples} images, grid.png{extra} to {os.path.abspath(out_dir)}")
