"""
model.py against diffusers, same random weights and inputs, one process: UNet forward, UNet
forward+backward, VAE decode, a DDIM sample with guidance, and a training step. For each: median
time, peak memory, and the largest output difference (so a speed win cannot hide a wrong result).

"train step" is one MagiCapture phase-2 step (train.py's): source, reference and composed samples
(3 per batch) in one UNet pass with the paper's LoRA (rank 4 on the cross-attention projections),
the masked reconstruction loss (eq. 4-6), attention refocusing (eq. 8) on the recorded 16x16
cross-attention maps (half the latent side below 256 px) of the two placeholder positions against
fixed random masks, and the identity loss (eq. 7): a second UNet pass of the composed samples at a
smaller t, Tweedie's x0, VAE decode with gradient, the aligned face crop at fixed
landmarks and a small frozen random conv net in ArcFace's place (shared by both sides); summed as
eq. 10, then backward into the LoRA only. Ours: lora.inject + UNet.record_attention; diffusers:
peft's LoRA (our A and B copied in) and an attention processor that keeps the probabilities. Its
max|diff| covers the loss and every LoRA gradient. Under the table: the step's FLOPs, counted as
train.py counts them for its log (model.count_flops), and the rate each side reaches.

    python bench.py                                                  # CPU fp32 small: 1-2 min on 2 idle cores
    python bench.py --device=cuda --dtype=bf16 --size=sd15 --resolution=512

Peak memory is the growth above what was in use just before the call: weights and inputs
excluded, gradients included. CUDA: torch.cuda.max_memory_allocated. CPU: the process's peak
resident set (VmHWM, reset via /proc/self/clear_refs after malloc_trim has returned freed heap to
the OS, so reused memory cannot hide growth); it counts all the process touches, not only
tensors. Linux/glibc only, "n/a" elsewhere. CPU timings need an otherwise idle machine.
"""

import copy, ctypes, gc, os, re, statistics, tempfile, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here: never touch the network

import torch
import torch.nn as nn
import faces
import lora
from configurator import configure
from losses import attention_refocus, identity_loss, masked_mse, total_loss
from model import (DTYPES, AttentionRecorder, AutoencoderKL, CLIPTextModel, Schedule, ScheduleConfig,
                   StableDiffusion, TextConfig, UNet, UNetConfig, VAEConfig, count_flops, tiny_tokenizer)

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
from peft import LoraConfig

diffusers.logging.set_verbosity_error()  # the "safety checker disabled" warning
transformers.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()  # and the loading bars
transformers.utils.logging.disable_progress_bar()
tdtype = DTYPES[dtype]
cuda = torch.device(device).type == "cuda"  # "cuda" or "cuda:N"
if cuda and torch.device(device).index is not None:
    torch.cuda.set_device(device)  # cuda:N: where the synchronisation and the memory statistics below look
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
for m in (pipe.unet, pipe.vae, pipe.text_encoder):  # frozen, as ours loads them (diffusers leaves them trainable;
    m.requires_grad_(False)                        # its training scripts freeze them): no weight gradients
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
    if cuda:
        torch.cuda.synchronize()

def proc_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

def peak_memory(fn):
    """Run fn once: (its output, peak bytes above what was in use before, or None where we cannot tell)."""
    gc.collect()
    if cuda:
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

# -----------------------------------------------------------------------------
# one MagiCapture phase-2 step, as train.py's micro_step runs it: `batch` draws of a source, a reference
# and a composed sample in one UNet pass (eq. 4-6), eq. 8 on their recorded cross-attention, and eq. 7's second
# pass of the composed samples, decoded with gradient, through an identity head; summed as eq. 10,
# whose two parts are backpropagated one after the other.
# Both sides train the paper's LoRA (rank 4 on the cross-attention projections) on copies of their UNets.

LAMBDA_ATTN, LAMBDA_ID = 2.5, 1.0  # train.py's eq. 10 weights (paper's values)
ATTN_SIDE = min(16, h // 2)  # the official code records the 16x16 maps; at 64 px there are none: half the latent
# prompt positions of <v1> and <v2>; the context is random, so the "token ids" below are just the positions
PLACEHOLDERS = [5, 6]
n = 3 * batch  # source, reference, composed per draw
ident_rows = [i for i in range(n) if i % 3 == 2]  # eq. 7 on the composed samples, as train.py (the paper's)
z0 = torch.randn(n, 4, h, h, generator=g).to(device, tdtype)
noise = torch.randn(n, 4, h, h, generator=g).to(device, tdtype)
t_step = torch.randint(1000, (n,), generator=g).to(device)  # paper: uniform over all T = 1000
t_id = torch.randint(1, 800, (len(ident_rows),), generator=g).to(device)  # official: its own t < 800
context_step = torch.randn(n, 77, unet_cfg.cross_attention_dim, generator=g).to(device, tdtype)
z_t = ours.schedule.add_noise(z0, noise, t_step)  # the noisy inputs are data: built once, shared
z_t_id = ours.schedule.add_noise(z0[ident_rows], noise[ident_rows], t_id)
ids = torch.arange(77).expand(n, 77).to(device)
loss_masks = (torch.rand(n, 1, h, h, generator=g) > 0.5).float().to(device)
attn_masks = (torch.rand(n, 2, h, h, generator=g) > 0.5).float().to(device)
present = torch.tensor([[True, False], [False, True], [True, True]], device=device).repeat(batch, 1)  # s, r, c
# the identity head, shared: the aligned crop at fixed landmarks (a face filling the image), then a small frozen
# random conv net in ArcFace's place, so eq. 7 costs the same on both sides
landmarks = [faces.ARCFACE_TEMPLATE * resolution / faces.ARCFACE_SIZE] * len(ident_rows)
id_head = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.SiLU(),
                        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 512))  # (B, 512), as ArcFace's
id_head = id_head.to(device).eval().requires_grad_(False)
id_target = torch.randn(len(ident_rows), 512, generator=g).to(device)

# ours: lora.inject; lora_B set nonzero so the update and lora_A's gradient are exercised
lora_unet = copy.deepcopy(ours.unet).requires_grad_(False)
lora.inject(lora_unet, lora.PAPER_UNET, rank=4, generator=g)
lora_names = [name for name, _ in lora_unet.named_parameters() if ".lora_" in name]
with torch.no_grad():
    for _, m in lora.lora_modules(lora_unet):
        m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.01)  # small: W stays dominant
lora_params = [lora_unet.get_parameter(name).requires_grad_(True) for name in lora_names]

# diffusers + peft: the same targets (peft fullmatches a string pattern), then our A and B copied in
peft_unet = copy.deepcopy(pipe.unet).requires_grad_(False)
peft_unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,  # the init is overwritten below
                                  target_modules="|".join(lora.PAPER_UNET)))
peft_name = lambda name: re.sub(r"\.(lora_[AB])\.", r".\1.default.", name)  # peft nests each adapter under its name
peft_names = sorted(name for name, _ in peft_unet.named_parameters() if ".lora_" in name)
assert sorted(map(peft_name, lora_names)) == peft_names, "peft's LoRA targets differ from lora.inject's"
with torch.no_grad():
    for name in lora_names:
        peft_unet.get_parameter(peft_name(name)).copy_(lora_unet.get_parameter(name))
peft_params = [peft_unet.get_parameter(peft_name(name)).requires_grad_(True) for name in lora_names]

class RecordingProcessor:
    """diffusers' attention processor for the cross-attention layers: at ATTN_SIDE x ATTN_SIDE feature maps, while
    `maps` is a list, it computes the probabilities explicitly and keeps the placeholder columns, with gradient
    (B, heads, h, w, 2); everywhere else, diffusers' SDPA processor."""

    def __init__(self):
        self.maps, self.sdpa = None, AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        B, T, _ = hidden_states.shape
        if self.maps is None or T != ATTN_SIDE ** 2:
            return self.sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B * heads, T, hs)
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k)  # (B * heads, T, 77)
        self.maps.append(probs.view(B, attn.heads, ATTN_SIDE, ATTN_SIDE, -1)[..., PLACEHOLDERS])
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))  # projection, dropout

recorder = RecordingProcessor()
peft_unet.set_attn_processor({name: recorder if name.endswith("attn2.processor") else AttnProcessor2_0()
                              for name in peft_unet.attn_processors})

def ours_recorded():
    rec = AttentionRecorder(ids, PLACEHOLDERS, (ATTN_SIDE,))
    with lora_unet.record_attention(rec):
        return lora_unet(z_t, t_step, context_step), rec.maps

def diffusers_recorded():
    recorder.maps = []
    try:
        return peft_unet(z_t, t_step, encoder_hidden_states=context_step).sample, recorder.maps
    finally:
        recorder.maps = None

def phase2_step(recorded, unet, decode, params):
    """The step: recorded() -> (noise prediction of the n samples, attention maps); unet(z, t, context) and
    decode(z) for eq. 7. Returns the loss and the LoRA gradients, in lora_names' order."""
    def fn():
        pred, maps = recorded()
        recon = torch.stack([masked_mse(pred[i:i + 1], noise[i:i + 1], loss_masks[i:i + 1])
                             for i in range(n)])  # eq. 4 (s), 5 (r), 6 (c)
        attn = attention_refocus(maps, attn_masks, present)  # eq. 8
        none, ones = torch.zeros_like(recon), torch.ones_like(recon)
        loss = total_loss(recon, attn, none, ones, LAMBDA_ATTN, LAMBDA_ID)  # eq. 10 without eq. 7, backpropagated
        loss.backward()  # before eq. 7's pass, as train.py does: one part's activations at a time
        eps = unet(z_t_id, t_id, context_step[ident_rows])
        z0_hat = ours.schedule.predict_x0(z_t_id, eps.float(), t_id)  # a formula of the shared schedule
        images = decode((z0_hat / ours.vae.config.scaling_factor).to(tdtype)).float()
        ident = torch.zeros_like(recon)
        ident[ident_rows] = identity_loss(id_head(faces.arcface_crop(images, landmarks)), id_target)  # eq. 7
        id_loss = total_loss(none, none, ident, ones, LAMBDA_ATTN, LAMBDA_ID)  # eq. 10's eq. 7 part
        id_loss.backward()
        loss = loss + id_loss
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None  # the next call starts without them (and measures them as growth)
        return [loss.detach()] + grads
    return fn

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
    "train step": (phase2_step(ours_recorded, lora_unet, ours.vae.decode, lora_params),
                   phase2_step(diffusers_recorded, lambda z, t, c: peft_unet(z, t, encoder_hidden_states=c).sample,
                               lambda z: pipe.vae.decode(z).sample, peft_params)),
}

# -----------------------------------------------------------------------------

assert sorted(n for n, _ in ours.unet.named_parameters()) == sorted(n for n, _ in pipe.unet.named_parameters())
dev_name = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
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
    if name == "train step":  # the rate each side reaches on the step's FLOPs, as train.py counts them (its mfu)
        with count_flops() as counter:
            ours_fn()
        flop = counter.get_total_flops()
        print(f"{'':16} {flop / 1e9:.1f} GFLOP: ours {flop / t_ours / 1e12:.2f} TFLOP/s, diffusers "
              f"{flop / t_ref / 1e12:.2f} TFLOP/s")
