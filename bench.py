"""
model.py against diffusers, same random weights and inputs, one process: UNet forward, UNet
forward+backward, VAE decode, and a DDIM sample with guidance. For each: median time, peak
memory, and the largest output difference (so a speed win cannot hide a wrong result).

    python bench.py                                                  # CPU fp32 small: ~1 min on 2 idle cores
    python bench.py --device=cuda --dtype=bf16 --size=sd15 --resolution=512

Peak memory is the growth above what was in use just before the call: weights and inputs
excluded, gradients included. CUDA: torch.cuda.max_memory_allocated. CPU: the process's peak
resident set (VmHWM, reset via /proc/self/clear_refs after malloc_trim has returned freed heap to
the OS, so reused memory cannot hide growth); it counts all the process touches, not only
tensors. Linux/glibc only, "n/a" elsewhere. CPU timings need an otherwise idle machine.
"""

import ctypes, gc, os, statistics, tempfile, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here: never touch the network

import torch
from configurator import configure
from model import (DTYPES, AutoencoderKL, CLIPTextModel, Schedule, ScheduleConfig, StableDiffusion, TextConfig,
                   UNet, UNetConfig, VAEConfig, tiny_tokenizer)

# -----------------------------------------------------------------------------
device = "cpu"  # or "cuda"
dtype = "fp32"  # or "bf16", "fp16"
size = "small"  # "sd15": SD1.5's UNet/VAE/text encoder configs, random weights; "small": a narrower copy
resolution = 256  # image side in pixels; the latents are resolution / 8
batch = 1
steps = 10  # DDIM steps of the sampling benchmark; each runs the UNet on 2 * batch (guidance)
repeats = 5  # timed runs after one warm-up; the median is reported
configure(globals())
# -----------------------------------------------------------------------------

import diffusers
import transformers
from diffusers.models.attention_processor import AttnProcessor2_0

diffusers.logging.set_verbosity_error()  # the "safety checker disabled" warning
transformers.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()  # and the loading bars
transformers.utils.logging.disable_progress_bar()
tdtype = DTYPES[dtype]
GUIDANCE = 7.5  # the SD default

# (UNet config, VAE config, text encoder sizes); the vocabulary is our tiny tokenizer's in both
SIZES = {
    "sd15": (UNetConfig(), VAEConfig(), dict()),  # model.py's defaults are SD1.5's config.json values
    "small": (UNetConfig(block_out_channels=(64, 128, 256, 256), cross_attention_dim=256),
              VAEConfig(block_out_channels=(32, 64, 128, 128)),
              dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                   projection_dim=256)),
}

# one random pipeline, saved in the diffusers layout, then loaded by both implementations
torch.manual_seed(0)
unet_cfg, vae_cfg, text_kw = SIZES[size]
tok = tiny_tokenizer()
random_sd = StableDiffusion(tok, CLIPTextModel(TextConfig(vocab_size=len(tok.vocab), **text_kw)),
                            AutoencoderKL(vae_cfg), UNet(unet_cfg), Schedule(ScheduleConfig()))
tmp = tempfile.TemporaryDirectory()
random_sd.to(tdtype).save_pretrained(tmp.name)  # saved in the benchmark dtype: half the disk for sd15 in bf16
del random_sd
ours = StableDiffusion.from_pretrained(tmp.name, device=device, dtype=tdtype)
pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp.name, dtype=tdtype, safety_checker=None).to(device)
pipe.scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, set_alpha_to_one=False, clip_sample=False)  # SD1.5's
pipe.set_progress_bar_config(disable=True)
# diffusers' default attention is SDPA; make sure nothing fell back to the slow math processor
assert all(isinstance(p, AttnProcessor2_0) for m in (pipe.unet, pipe.vae) for p in m.attn_processors.values())

# inputs, shared by both
g = torch.Generator().manual_seed(1)
h = resolution // 8
latents = torch.randn(batch, 4, h, h, generator=g).to(device, tdtype)
context = torch.randn(batch, 77, unet_cfg.cross_attention_dim, generator=g).to(device, tdtype)
t = torch.full((batch,), 500, device=device)
prompts = ["a photo of a person"] * batch

# -----------------------------------------------------------------------------
# timing and memory

LIBC = ctypes.CDLL("libc.so.6") if os.path.exists("/proc/self/clear_refs") else None

def sync():
    if device == "cuda":
        torch.cuda.synchronize()

def proc_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

def peak_memory(fn):
    """Run fn once: (its output, peak bytes above what was in use before, or None where we cannot tell)."""
    gc.collect()
    if device == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        sync()
        return out, torch.cuda.max_memory_allocated() - base
    if LIBC is None:
        return fn(), None
    LIBC.malloc_trim(0)  # give freed heap back to the OS, or reusing it would not show as growth
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    base = proc_kb("VmRSS")
    out = fn()
    return out, (proc_kb("VmHWM") - base) * 1024

def measure(fns):
    """Time each fn (median of `repeats` runs after a warm-up), then measure its peak memory in one more run.
    The runs of ours and diffusers alternate, so a slow spell of a shared machine hits both alike."""
    for fn in fns:
        fn()  # warm-up: lazy init, kernel and algorithm selection
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
    outs, mems = zip(*(peak_memory(fn) for fn in fns))
    return [statistics.median(ts) for ts in times], mems, outs

# -----------------------------------------------------------------------------
# the benchmarks: name -> (ours, diffusers); each returns the tensors to compare

def train_step(unet, forward):
    """Forward+backward with gradients on every UNet parameter; returns the output and the gradients by name."""
    def fn():
        out = forward()
        out.float().square().mean().backward()
        grads = [p.grad for _, p in sorted(unet.named_parameters())]
        unet.zero_grad(set_to_none=True)  # the next call starts without them (and measures them as growth)
        return [out.detach()] + grads
    return fn

def no_grad(fn):
    return lambda: [torch.no_grad()(fn)()]

BENCHES = {
    "unet forward": (no_grad(lambda: ours.unet(latents, t, context)),
                     no_grad(lambda: pipe.unet(latents, t, encoder_hidden_states=context).sample)),
    "unet fwd+bwd": (train_step(ours.unet, lambda: ours.unet(latents, t, context)),
                     train_step(pipe.unet, lambda: pipe.unet(latents, t, encoder_hidden_states=context).sample)),
    "vae decode": (no_grad(lambda: ours.vae.decode(latents)), no_grad(lambda: pipe.vae.decode(latents).sample)),
    f"ddim {steps} steps": (
        lambda: [ours.sample(prompts, steps=steps, guidance=GUIDANCE, latents=latents, height=resolution,
                             width=resolution)],
        lambda: [pipe(prompts, num_inference_steps=steps, guidance_scale=GUIDANCE, latents=latents,
                      output_type="pt").images]),
}

# -----------------------------------------------------------------------------

assert sorted(n for n, _ in ours.unet.named_parameters()) == sorted(n for n, _ in pipe.unet.named_parameters())
dev_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
print(f"{size} {resolution}px batch {batch} {dtype} on {dev_name}; torch {torch.__version__}, "
      f"diffusers {diffusers.__version__}; median of {repeats}")
mb = lambda m: "n/a" if m is None else f"{m / 2**20:.0f}"
ratio = lambda a, b: "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"
print(f"{'':16} {'ours ms':>9} {'diffusers':>9} {'ratio':>6} | {'ours MB':>8} {'diffusers':>9} {'ratio':>6} "
      f"| {'max|diff|':>9} {'rel':>8}")
for name, (ours_fn, ref_fn) in BENCHES.items():
    if name == "unet fwd+bwd":
        for unet in (ours.unet, pipe.unet):
            unet.train().requires_grad_(True)
    (t_ours, t_ref), (m_ours, m_ref), (out_ours, out_ref) = measure([ours_fn, ref_fn])
    for unet in (ours.unet, pipe.unet):
        unet.eval().requires_grad_(False)
    # largest absolute difference over all tensors, and the largest relative to each tensor's own scale
    diffs = [((a.float() - b.float()).abs().max().item(), b.float().abs().max().item())
             for a, b in zip(out_ours, out_ref)]
    err = max(d for d, _ in diffs)
    rel = max(d / s if s else d for d, s in diffs)
    print(f"{name:16} {t_ours * 1e3:9.1f} {t_ref * 1e3:9.1f} {ratio(t_ours, t_ref):>6} | {mb(m_ours):>8} "
          f"{mb(m_ref):>9} {ratio(m_ours, m_ref):>6} | {err:9.2e} {rel:8.1e}")
