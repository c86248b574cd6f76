"""
MagiCapture training: learn a person <v1> and a style <v2> in Stable Diffusion 1.5.

    python train.py config/tiny.py           # tiny random model + drawn faces: the mechanics, on a CPU
    python train.py config/portrait.py --source_dir=me --reference_dir=style
    python train.py config/portrait.py --resume

Phase 1 (textual inversion) learns only the two token embeddings; phase 2 adds
LoRA on the UNet and trains with composed prompts and attention refocusing.
Paper: Hyung, Shin, Choo, "MagiCapture", AAAI 2024 (equations cited below).
"""

import glob
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
import lora
from configurator import configure
from losses import attention_outside, attention_refocus, identity_loss, masked_mse, predict_x0
from model import AttentionRecorder, StableDiffusion

# -----------------------------------------------------------------------------
# data and model
init_from = "stable-diffusion-v1-5/stable-diffusion-v1-5"
variant = None                   # "fp16": half-size downloads
source_dir = "data/source"       # 4-6 photos of the person ([V1]), each with <name>_mask.png (white = face)
reference_dir = "data/reference" # 4-6 photos in the style ([V2]), same masks (the face is left out of [V2])
synthetic_data = False           # draw a small synthetic data set into the two folders first (config/tiny.py)
resolution = 512
out_dir = "out/magicapture"
seed = 0
# tokens
tokens = ("<v1>", "<v2>")        # [V1] the person, [V2] the style
init_v1 = "person"               # official code: the subject token starts as "person"
init_v2 = ""                     # "": random N(0, 0.017) as in the official code; or a word
source_templates = ("a photo of {} person", "a portrait of {} person", "a close-up photo of {} person",
                    "a good photo of {} person", "a cropped photo of {} person")
reference_templates = ("a photo of a person in the {} style", "a portrait of a person in the {} style",
                       "a picture of a person in the {} style")
composed_templates = ("a photo of {} person in the {} style", "a portrait of {} person in the {} style",
                      "a picture of {} person in the {} style")
neutral_prompt = "a photo of a person"  # validation: no placeholder, to see leakage
# phase 1: textual inversion (paper: 1200 steps, lr 5e-4)
phase1_steps = 1200
lr_embed1 = 5e-4
# phase 2: LoRA + embeddings (paper: 1500 steps, lr 1e-4 LoRA, 1e-5 embeddings)
phase2_steps = 1500
lr_lora = 1e-4
lr_embed2 = 1e-5
lora_rank = 4
lora_alpha = 4.0
lora_targets = lora.PAPER_UNET   # paper: the cross-attention projections
lora_text_encoder = False        # official script: also LoRA on the text encoder's attention
lr_lora_text = 1e-4
# loss (paper eq. 4-8)
composed = True                  # L_mask^c on; False = the paper's "w/o CP" ablation
lambda_attn = 2.5                # eq. 8 weight; 0 = the paper's "w/o AR" ablation
lambda_id = 1.0                  # eq. 7 weight (paper 1.0; official script 0.25)
t_id_max = 800                   # official code: the identity loss draws its own t < 800 (paper: T' < T)
attn_resolutions = (16,)         # feature-map sides recorded for eq. 8 (official: 16x16 at 512 px)
style_boost = 1.0                # official code: 2.0 on the style and composed losses in each phase's first half
# faces (DESIGN.md section 4): "" takes the file from the Hub repo facefusion/models-3.0.0; or a local .onnx
detector_model = ""
recognizer_model = ""
parser_model = ""
face_crop = True                 # crop each photo to a square around its largest face before resizing
face_margin = 1.0                # crop side = face size * (1 + 2 * face_margin), as far as the photo allows
mask_classes = tuple(range(1, 14))  # BiSeNet classes of the paper's face region: skin, brows, eyes, glasses,
                                    # ears, earring, nose, mouth, lips (add 17 for hair)
# optimisation
grad_accum = 4                   # paper: batch 1, gradient accumulation 4
weight_decay = 1e-3              # AdamW, on LoRA (official); embeddings have none
grad_clip = 1.0
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bf16" if torch.cuda.is_available() else "fp32"  # compute dtype of the frozen parts: fp32, bf16, fp16
gradient_checkpointing = False
# logging, evaluation, checkpoints
log_interval = 10
eval_interval = 250
eval_seeds = (0, 1)
eval_steps = 30                  # DDIM steps for validation samples
ckpt_interval = 250
keep_checkpoints = 2
resume = False
# -----------------------------------------------------------------------------
config = configure(globals())
if len(tokens) != 2 or not (phase1_steps >= 0 and phase2_steps >= 0 and grad_accum >= 1):
    raise SystemExit("tokens must be two strings; phase steps >= 0; grad_accum >= 1")
if resolution % 64:
    raise SystemExit(f"resolution must be a multiple of 64, got {resolution}")
os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(seed)

# -----------------------------------------------------------------------------
# data: read, check, crop; masks; all before any model loads
if synthetic_data:
    data.make_synthetic(source_dir, reference_dir)
sources = data.load_folder(source_dir)
references = data.load_folder(reference_dir)
photos = sources + references
unmasked = sum(it["mask_photo"] is None for it in photos)
why = [w for w, on in (("face crops", face_crop), ("the identity loss", lambda_id > 0),
                       (f"masks of {unmasked} photos without <name>_mask.png", unmasked)) if on]
need_faces = bool(why)
if need_faces:
    import faces
    print(f"face models needed for {', '.join(why)}")

def find_faces(items):
    """Each photo's largest face, checked; detections cached in out_dir/faces.json (a resumed run reuses them)."""
    cache_path = os.path.join(out_dir, "faces.json")
    cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    none = []
    for it in items:
        st = os.stat(it["path"])
        key = f"{os.path.abspath(it['path'])}|{st.st_size}|{st.st_mtime_ns}|{detector_model}"
        if key not in cache:
            cache[key] = [dict(box=f.box.tolist(), score=float(f.score), landmarks=f.landmarks.tolist())
                          for f in faces.detect(np.asarray(it["photo"]), model=detector_model or None)]
        found = [faces.Face(np.array(d["box"], np.float32), d["score"], np.array(d["landmarks"], np.float32))
                 for d in cache[key]]
        if not found:
            none.append(it["path"])
            continue
        if len(found) > 1:
            print(f"{it['path']}: {len(found)} faces; using the largest")
        it["face"] = face = faces.largest(found)
        (x1, y1, x2, y2), (w, h) = face.box, it["photo"].size
        if max(x2 - x1, y2 - y1) < max(64, 0.1 * min(w, h)):
            print(f"warning: {it['path']}: the face is only {max(x2 - x1, y2 - y1):.0f} px across; "
                  "closer photos teach the identity better")
        if x1 < 1 or y1 < 1 or x2 > w - 1 or y2 > h - 1:
            print(f"warning: {it['path']}: the face is cut off at the photo's border")
    with open(cache_path, "w") as f:
        json.dump(cache, f)
    if none:
        raise SystemExit("no face found in:\n  " + "\n  ".join(none) + "\nA usable photo shows one person's face "
                         "from the front or three-quarter view, unobstructed, at least ~100 pixels across.")

def face_in_crop(face, square):
    """The face's box and landmarks in the coordinates of the cropped, resized photo."""
    left, top, side = square
    k = resolution / side
    shift = np.array([left, top], np.float32)
    return faces.Face(((face.box.reshape(2, 2) - shift) * k).reshape(4), face.score, (face.landmarks - shift) * k)

if need_faces:
    find_faces(photos)
for it in photos:
    box = it["face"].box if face_crop else None
    data.crop(it, data.square_around(it["photo"].size, box, face_margin), resolution)
    if need_faces:
        it["face"] = face_in_crop(it["face"], it["square"])
    if it["mask"] is None:  # the paper's face region from the parser, inside the detected box
        m = faces.face_mask(data.to_uint8(it["image"] / 2 + 0.5), it["face"], model=parser_model or None,
                            classes=mask_classes)
        it["mask"] = torch.from_numpy(np.asarray(m, np.float32))[None]
os.makedirs(os.path.join(out_dir, "masks"), exist_ok=True)
for kind, items in (("source", sources), ("reference", references)):
    for it in items:
        name = os.path.splitext(os.path.basename(it["path"]))[0]
        data.save_overlay(it, it["mask"], os.path.join(out_dir, "masks", f"{kind}_{name}.png"))
print(f"{len(sources)} source and {len(references)} reference photos; masks drawn in {out_dir}/masks")
if lambda_id > 0:  # the ArcFace the identity loss backpropagates through, and the target identity
    arcface = faces.arcface_torch(recognizer_model or None)

# -----------------------------------------------------------------------------
# model
ptdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
sd = StableDiffusion.from_pretrained(init_from, device=device, dtype=ptdtype, variant=variant)
sd.unet.gradient_checkpointing = sd.vae.gradient_checkpointing = gradient_checkpointing
autocast = torch.autocast(device_type="cuda", dtype=ptdtype, enabled=(device == "cuda" and dtype != "fp32"))
scaler = torch.amp.GradScaler("cuda", enabled=(dtype == "fp16"))  # fp16 needs loss scaling; bf16 does not

# placeholder tokens: new rows of the embedding table, trained as one small fp32 parameter
ids = sd.tokenizer.add_tokens(list(tokens))
sd.text_encoder.resize_token_embeddings(len(sd.tokenizer))
table = sd.text_encoder.text_model.embeddings.token_embedding
embeds = torch.empty(2, table.embedding_dim, device=device)
init_ids = sd.tokenizer([init_v1, init_v2])
for i, word in enumerate((init_v1, init_v2)):
    if word:
        word_ids = init_ids[i][1:][init_ids[i][1:] != sd.tokenizer.eos_id]
        if len(word_ids) != 1:
            raise SystemExit(f"init word {word!r} is {len(word_ids)} tokens; pick a word that is one token")
        embeds[i] = table.weight[word_ids[0]].float()
    else:
        noise = torch.randn(table.embedding_dim, generator=torch.Generator().manual_seed(seed))
        embeds[i] = noise.to(device) * 0.017  # official code's std
embeds = torch.nn.Parameter(embeds)

def use_learned_rows(module, args, out):
    # the token lookup returns our fp32 rows for the placeholder ids: every other row stays untouched
    tok = args[0]
    new = (tok >= ids[0]) & (tok <= ids[1])
    return torch.where(new[..., None], embeds[(tok - ids[0]).clamp(0, 1)].to(out.dtype), out)

table.register_forward_hook(use_learned_rows)

if lambda_id > 0:
    arcface = arcface.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def source_identity():
        """Mean ArcFace embedding of the aligned source faces (normalised): R(B(I_s)) of eq. 7."""
        crops = torch.cat([faces.warp_torch(it["image"][None].float().to(device), torch.tensor(
            faces.similarity_transform(it["face"].landmarks, faces.ARCFACE_TEMPLATE), dtype=torch.float32,
            device=device)[None], 112) for it in sources])
        return F.normalize(F.normalize(arcface(crops), dim=-1).mean(0), dim=-1)

    src_id = source_identity()

# latents cached once: the VAE is frozen, so each photo's posterior never changes
@torch.no_grad()
def encode(items):
    x = torch.stack([it["image"] for it in items]).to(device, ptdtype)
    mean, logvar = sd.vae.encode(x)
    return mean.float(), (0.5 * logvar.float()).exp()

src_mean, src_std = encode(sources)
ref_mean, ref_std = encode(references)
h = resolution // 8
def latent_masks(items):
    return F.interpolate(torch.stack([it["mask"] for it in items]), size=(h, h), mode="bilinear").to(device)
src_face = latent_masks(sources)           # M_s: face of each source photo
ref_face = latent_masks(references)        # 1 - M_r
ref_rest = 1 - ref_face                    # M_r: everything but the face

# -----------------------------------------------------------------------------
# the losses of one micro-step: eq. 4, 5, 6 and 8 in one batched UNet pass
gen = torch.Generator().manual_seed(seed)  # data order, noise and timesteps: one seed, saved in checkpoints
T = sd.schedule.config.num_train_timesteps
scale_factor = sd.vae.config.scaling_factor

def rand(*shape):
    return torch.randn(*shape, generator=gen).to(device)

def pick(n):
    return int(torch.randint(n, (1,), generator=gen))

def prompt(templates, *words):
    return templates[pick(len(templates))].format(*words)

def losses_for_step(phase, boost):
    """Sum of the phase's loss terms for one source and one reference photo -> (total, {term: value})."""
    s, r = pick(len(sources)), pick(len(references))
    zs = (src_mean[s] + src_std[s] * rand(*src_mean[s].shape)) * scale_factor
    zr = (ref_mean[r] + ref_std[r] * rand(*ref_mean[r].shape)) * scale_factor
    # (name, latent, prompt, loss mask, attention masks for [<v1>, <v2>] or None, weight)
    items = [("s", zs, prompt(source_templates, tokens[0]), src_face[s], (src_face[s], None), 1.0),
             ("r", zr, prompt(reference_templates, tokens[1]), ref_rest[r], (None, ref_rest[r]), boost)]
    if phase == 2 and composed:
        items.append(("c", zr, prompt(composed_templates, *tokens), ref_rest[r], (ref_face[r], ref_rest[r]), boost))
    z0 = torch.stack([it[1] for it in items])
    noise = rand(*z0.shape)
    t = torch.randint(T, (len(items),), generator=gen).to(device)
    text_ids = sd.tokenizer([it[2] for it in items]).to(device)
    record = phase == 2 and lambda_attn > 0
    rec = AttentionRecorder(text_ids, ids, attn_resolutions if record else ())  # () records nothing
    with autocast, sd.unet.record_attention(rec):
        context = sd.text_encoder(text_ids)
        pred = sd.unet(sd.schedule.add_noise(z0, noise, t), t, context)
    terms, total = {}, 0.0
    for i, (name, _, _, mask, _, weight) in enumerate(items):
        terms[name] = masked_mse(pred[i:i + 1], noise[i:i + 1], mask[None])  # eq. 4 (s), 5 (r), 6 (c)
        total = total + weight * terms[name]
    if record:
        if not rec.maps:
            raise SystemExit(f"attn_resolutions={attn_resolutions} matches no cross-attention layer at "
                             f"resolution {resolution}; pick sides of the UNet's feature maps")
        # a token absent from a prompt gets an all-ones mask: nothing is outside, so it costs nothing
        ones = torch.ones_like(src_face[0])
        masks = torch.stack([torch.stack([m if m is not None else ones for m in it[4]]) for it in items])
        terms["attn"] = attention_refocus(rec.maps, masks[:, :, 0])  # eq. 8
        total = total + lambda_attn * terms["attn"]
    if phase == 2 and lambda_id > 0:  # eq. 7 on the source and composed samples
        sel = [i for i, it in enumerate(items) if it[0] in ("s", "c")]
        terms["id"], terms["id_skipped"] = identity_term(z0[sel], noise[sel], context[sel])
        if terms["id"] is not None:
            total = total + lambda_id * terms["id"]
        else:
            del terms["id"]
    return total, terms

def identity_term(z0, noise, context):
    """Eq. 7: a second UNet pass at t_id < t_id_max (same noise), Tweedie's x0, decoded with gradient,
    cropped at the landmarks the detector finds on a detached copy, through ArcFace, 1 - cos to the
    source identity. A sample without a detected face is skipped and counted."""
    t_id = torch.randint(1, t_id_max, (len(z0),), generator=gen).to(device)
    z_t = sd.schedule.add_noise(z0, noise, t_id)
    with autocast:
        eps = sd.unet(z_t, t_id, context)
        z0_hat = predict_x0(z_t, eps.float(), sd.schedule.alphas_cumprod.to(device)[t_id])
        images = sd.vae.decode((z0_hat / scale_factor).to(ptdtype)).float()  # (B, 3, H, W) in about [-1, 1]
    embs, skipped = [], 0
    for image in images:
        found = faces.detect(data.to_uint8(image / 2 + 0.5), model=detector_model or None)
        if not found:
            skipped += 1
            continue
        M = faces.similarity_transform(faces.largest(found).landmarks, faces.ARCFACE_TEMPLATE)
        crop = faces.warp_torch(image[None], torch.tensor(M, dtype=torch.float32, device=device)[None], 112)
        embs.append(arcface(crop))
    if not embs:
        return None, torch.tensor(float(skipped))
    return identity_loss(torch.cat(embs), src_id.expand(len(embs), -1)), torch.tensor(float(skipped))

# -----------------------------------------------------------------------------
# validation: fixed seeds, the four prompts, and how much each token attends outside its region
val_prompts = [composed_templates[0].format(*tokens), source_templates[0].format(tokens[0]),
               reference_templates[0].format(tokens[1]), neutral_prompt]

@torch.no_grad()
def evaluate(step):
    images = [sd.sample([p], steps=eval_steps, seed=s, height=resolution, width=resolution)
              for p in val_prompts for s in eval_seeds]
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    path = os.path.join(out_dir, "samples", f"step{step:05d}.png")
    data.save_labeled_grid(torch.cat(images).cpu(), len(eval_seeds), val_prompts, path)
    return dict(attention_on_validation(), samples=path)

@torch.no_grad()
def attention_on_validation():
    """Composed prompt on every reference photo at t=500, fixed noise. attn_outside: each token's mean
    scaled attention outside its mask (what eq. 8 lowers). attn_mass: its mean raw attention probability,
    which the min-max scaling of eq. 8 cannot see: a token can satisfy eq. 8 by receiving almost none."""
    g = torch.Generator().manual_seed(seed)
    z0 = ref_mean * scale_factor
    noise = torch.randn(z0.shape, generator=g).to(device)
    t = torch.full((len(z0),), T // 2, device=device)
    text_ids = sd.tokenizer([val_prompts[0]] * len(z0)).to(device)
    rec = AttentionRecorder(text_ids, ids, attn_resolutions)
    with autocast, sd.unet.record_attention(rec):
        sd.unet(sd.schedule.add_noise(z0, noise, t), t, sd.text_encoder(text_ids))
    if not rec.maps:
        return {}
    outside = attention_outside(rec.maps, torch.stack([ref_face, ref_rest], dim=1)[:, :, 0])
    mass = torch.stack([m.float().mean(dim=(0, 1, 2, 3)) for m in rec.maps]).mean(0)
    return dict(attn_outside={tok: round(v, 5) for tok, v in zip(tokens, outside.tolist())},
                attn_mass={tok: float(f"{v:.3g}") for tok, v in zip(tokens, mass.tolist())})

# -----------------------------------------------------------------------------
# optimisers: one per phase, linear decay to 0 over the phase
def setup_phase(phase):
    if phase == 1:
        groups = [dict(params=[embeds], lr=lr_embed1, weight_decay=0.0)]
        steps = phase1_steps
    else:
        if not lora.lora_modules(sd.unet):
            torch.manual_seed(seed)  # LoRA's random init: the same whatever ran before in this process
            lora.inject(sd.unet, lora_targets, rank=lora_rank, alpha=lora_alpha)
            if lora_text_encoder:
                lora.inject(sd.text_encoder, lora.OFFICIAL_TEXT_ENCODER, rank=lora_rank, alpha=lora_alpha)
        for p in lora.lora_parameters(sd.unet) + lora.lora_parameters(sd.text_encoder):
            p.data = p.data.float()  # trainable weights stay fp32 whatever the compute dtype
            p.requires_grad_(True)
        groups = [dict(params=[embeds], lr=lr_embed2, weight_decay=0.0),
                  dict(params=lora.lora_parameters(sd.unet), lr=lr_lora, weight_decay=weight_decay)]
        if lora_text_encoder:
            groups.append(dict(params=lora.lora_parameters(sd.text_encoder), lr=lr_lora_text,
                               weight_decay=weight_decay))
        steps = phase2_steps
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / max(1, steps)))
    return opt, sched

def trainable():
    return [p for g in opt.param_groups for p in g["params"]]

def lora_tensors():
    return {k: v for m in (sd.unet, sd.text_encoder) for k, v in m.state_dict().items() if ".lora_" in k}

def save_checkpoint(step):
    """Atomic: write to a temporary file, then rename; keep the last keep_checkpoints."""
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    state = dict(step=step, phase=phase, embeds=embeds.detach().cpu(), lora=lora_tensors(), optimizer=opt.state_dict(),
                 scheduler=sched.state_dict(), scaler=scaler.state_dict(), gen=gen.get_state(),
                 torch_rng=torch.get_rng_state(), config=config)
    path = os.path.join(ckpt_dir, f"step{step:06d}.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    for old in sorted(glob.glob(os.path.join(ckpt_dir, "step*.pt")))[:-keep_checkpoints]:
        os.remove(old)

def save_outputs():
    """The three weight files other tools read (README: loading them in diffusers, A1111, ComfyUI)."""
    meta = {k: json.dumps(v) for k, v in config.items() if k in ("init_from", "lora_rank", "lora_alpha", "seed",
                                                                 "phase1_steps", "phase2_steps", "resolution")}
    from safetensors.torch import save_file
    save_file({tok: embeds[i].detach().cpu().contiguous() for i, tok in enumerate(tokens)},
              os.path.join(out_dir, lora.EMBEDS_FILE), metadata=meta)
    if lora.lora_modules(sd.unet):
        te = sd.text_encoder if lora_text_encoder else None
        lora.save_lora_file(sd.unet, te, os.path.join(out_dir, lora.LORA_FILE), metadata=meta)
        lora.export_kohya(sd.unet, te, os.path.join(out_dir, "lora_kohya.safetensors"),
                          metadata=dict(meta, network_dim=str(lora_rank), network_alpha=str(lora_alpha)))

def plot_losses(log_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(log_path) as f:
        rows = [json.loads(l) for l in f if l.strip()]
    fig, ax = plt.subplots(figsize=(8, 4))
    for key in ("loss", "loss_s", "loss_r", "loss_c", "loss_attn"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key, lw=1)
    ax.axvline(phase1_steps, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("step"), ax.set_yscale("log"), ax.legend(), ax.set_title("MagiCapture training loss")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)

# -----------------------------------------------------------------------------
# resume, then the loop
total_steps = phase1_steps + phase2_steps
log_path = os.path.join(out_dir, "log.jsonl")
start, phase, opt, sched, ckpt = 0, None, None, None, None
if resume:
    found = sorted(glob.glob(os.path.join(out_dir, "checkpoints", "step*.pt")))
    if not found:
        raise SystemExit(f"--resume: no checkpoint in {out_dir}/checkpoints")
    ckpt = torch.load(found[-1], map_location="cpu", weights_only=True)  # tensors and plain values only
    changed = {k: (ckpt["config"].get(k), v) for k, v in config.items() if k != "resume" and ckpt["config"].get(k) != v}
    if changed:
        print(f"warning: settings differ from the checkpoint's: {changed}")
    start = ckpt["step"]
    with torch.no_grad():
        embeds.copy_(ckpt["embeds"])
    gen.set_state(ckpt["gen"])
    torch.set_rng_state(ckpt["torch_rng"])
    if os.path.exists(log_path):  # drop log lines written after the checkpoint by the interrupted run
        with open(log_path) as f:
            kept = [l for l in f if l.strip() and json.loads(l)["step"] <= start]
        with open(log_path, "w") as f:
            f.writelines(kept)
    print(f"resuming from {found[-1]} at step {start}")
elif os.path.exists(log_path):
    os.remove(log_path)
with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)

print(f"phase 1: {phase1_steps} steps (embeddings), phase 2: {phase2_steps} steps (LoRA + embeddings); "
      f"{grad_accum} micro-steps of 1 source + 1 reference photo per step; {total_steps * grad_accum} UNet "
      f"batches in all; compute {dtype} on {device}")

from tqdm import tqdm
bar = tqdm(range(start, total_steps), initial=start, total=total_steps, unit="step")
t0 = time.time()
for step in bar:
    p = 1 if step < phase1_steps else 2
    if p != phase:  # a phase starts (or resumes): new optimiser and schedule
        phase = p
        opt, sched = setup_phase(phase)
        if ckpt is not None and ckpt["phase"] == phase:  # resuming inside this phase
            with torch.no_grad():
                for k, v in lora_tensors().items():
                    v.copy_(ckpt["lora"][k])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
        ckpt = None
    phase_start, phase_len = (0, phase1_steps) if phase == 1 else (phase1_steps, phase2_steps)
    boost = style_boost if step - phase_start < phase_len / 2 else 1.0
    sums = {}
    for micro in range(grad_accum):
        total, terms = losses_for_step(phase, boost)
        for name, v in terms.items():
            if not torch.isfinite(v):
                raise SystemExit(f"step {step}: loss term '{name}' is {v.item()}. Nothing was saved from this step; "
                                 f"the last checkpoint is in {out_dir}/checkpoints. Try a lower learning rate, "
                                 "dtype=bf16 instead of fp16, or check the photos and masks.")
            sums[name] = sums.get(name, 0.0) + v.item() / (1 if name == "id_skipped" else grad_accum)
        sums["loss"] = sums.get("loss", 0.0) + total.item() / grad_accum
        scaler.scale(total / grad_accum).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(trainable(), grad_clip)
    scaler.step(opt)
    scaler.update()
    sched.step()
    opt.zero_grad(set_to_none=True)

    done = step + 1
    row = dict(step=done, phase=phase, loss=sums.pop("loss"), **{k if k == "id_skipped" else f"loss_{k}": v for k, v in sums.items()},
               lr=sched.get_last_lr()[0], **({"lr_lora": sched.get_last_lr()[1]} if phase == 2 else {}), seconds=round(time.time() - t0, 2))
    if done % eval_interval == 0 or done == phase1_steps or done == total_steps:
        row.update(evaluate(done))
    if done % log_interval == 0 or "samples" in row or done == total_steps:
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
    bar.set_postfix(phase=phase, loss=f"{row['loss']:.4f}")
    if done % ckpt_interval == 0 or done == phase1_steps or done == total_steps:
        save_checkpoint(done)

save_outputs()
plot_losses(log_path, os.path.join(out_dir, "loss.png"))
if device == "cuda":
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
print(f"done: {out_dir} holds {lora.LORA_FILE}, {lora.EMBEDS_FILE}, lora_kohya.safetensors, config.json, "
      f"log.jsonl, loss.png, samples/, masks/")
