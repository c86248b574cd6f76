"""
Draw images from a Stable Diffusion 1.5 pipeline with DDIM.

    python sample.py                                   # the tiny random pipeline, on any machine
    python sample.py --init_from=stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt="a photo of an astronaut"
    python sample.py config/sample_sd15.py --seed=7 --num_samples=8

Writes one PNG per image (named by its seed, so any image can be drawn again alone)
and a grid.png, into out_dir.
"""

import json
import os

import numpy as np
import torch
from PIL import Image

from configurator import configure
from model import StableDiffusion

# -----------------------------------------------------------------------------
init_from = "tiny"        # a Hub repo id, a diffusers-layout folder, or "tiny"
variant = None            # "fp16" downloads the half-size weight files
prompt = "a photo of a person"
negative_prompt = ""
steps = 50
guidance = 7.5            # classifier-free guidance scale
eta = 0.0                 # 0 = deterministic DDIM
seed = 0                  # image i uses seed + i
num_samples = 4
batch_size = 4
height = None             # None: the model's native size (512 for SD1.5, 128 for tiny)
width = None
out_dir = "out/samples"
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "fp16" if torch.cuda.is_available() else "fp32"   # fp32, bf16 or fp16
# -----------------------------------------------------------------------------

def save_png(image, path):
    """(3, H, W) float in [0, 1] -> 8-bit PNG."""
    Image.fromarray((image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)).save(path)

def grid(images, cols=4):
    """(N, 3, H, W) -> (3, rows*H, cols*W), filled row by row, white where empty."""
    n, c, h, w = images.shape
    cols = min(cols, n)
    rows = -(-n // cols)
    out = torch.ones(c, rows * h, cols * w)
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        out[:, r * h:(r + 1) * h, k * w:(k + 1) * w] = im
    return out

def main():
    config = configure(globals())
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    sd = StableDiffusion.from_pretrained(init_from, device=device, dtype=torch_dtype, variant=variant)
    H = height or sd.vae.config.sample_size
    W = width or sd.vae.config.sample_size
    os.makedirs(out_dir, exist_ok=True)
    seeds = [seed + i for i in range(num_samples)]
    images = []
    for b in range(0, num_samples, batch_size):
        chunk = seeds[b:b + batch_size]
        # one generator per image: image i is the same whatever the batch size
        latents = torch.cat([torch.randn(1, sd.vae.config.latent_channels, H // 8, W // 8,
                                         generator=torch.Generator().manual_seed(s)) for s in chunk])
        print(f"images {b + 1}-{b + len(chunk)} of {num_samples}")
        out = sd.sample([prompt] * len(chunk), negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                        eta=eta, seed=chunk[0], latents=latents, height=H, width=W, progress=True).cpu()
        for s, im in zip(chunk, out):
            save_png(im, os.path.join(out_dir, f"seed{s}.png"))
        images.append(out)
    save_png(grid(torch.cat(images)), os.path.join(out_dir, "grid.png"))
    with open(os.path.join(out_dir, "sample.json"), "w") as f:
        json.dump(dict(config, height=H, width=W), f, indent=2)
    print(f"wrote {num_samples} images and grid.png to {os.path.abspath(out_dir)}")

if __name__ == "__main__":
    main()
