"""
MagiCapture training: learn a person <v1> and a style <v2> in Stable Diffusion 1.5.

    python train.py config/tiny.py           # tiny random model + drawn faces: the mechanics, on a CPU
    python train.py config/portrait.py --source_dir=me --reference_dir=style
    python train.py config/portrait.py --resume      # carry on after a crash, a stop or Ctrl-C
    python train.py config/portrait.py --overwrite   # start over in an out_dir that holds a run

Phase 1 (textual inversion) learns only the two token embeddings; phase 2 adds
LoRA on the UNet and trains with composed prompts and attention refocusing.
Paper: Hyung, Shin, Choo, "MagiCapture", AAAI 2024 (equations cited below).
"""

import contextlib
import copy
import datetime
import gc
import glob
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import data
import lora
from configurator import check_choice, check_device, configure
from losses import (attention_outside, attention_refocus, dino_style_loss, identity_loss, masked_mse,
                    patch_contrastive_loss, self_similarity_loss, total_loss)
from model import DTYPES, ViT, AttentionRecorder, StableDiffusion, count_flops, dino_preprocess, to_device

# -----------------------------------------------------------------------------
# data and model
init_from = "stable-diffusion-v1-5/stable-diffusion-v1-5"
variant = None                   # "fp16": half-size downloads
source_dir = "data/source"       # 4-6 photos of the person ([V1]); <name>_mask.png (white = face) optional
reference_dir = "data/reference" # 4-6 photos in the style ([V2]); the face is left out of [V2]
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
lora_alpha = 4.0                 # W' = W + (alpha / rank) U V^T: 4 = the default rank, no extra scaling
lora_targets = lora.PAPER_UNET   # paper: the cross-attention projections; () = no LoRA (the baselines)
lora_text_encoder = False        # official script: also LoRA on the text encoder's attention
lr_lora_text = 1e-4
full_targets = ()                # parameters trained in full in phase 2: regexes over "unet.<name>" and
                                 # "text_encoder.<name>" (DreamBooth: all; Custom Diffusion: attn2.to_k, to_v)
lr_full = 1e-6
save_pipeline = False            # also write the whole fine-tuned pipeline to out_dir/pipeline (DreamBooth)
# loss (paper eq. 4-8, weighed as eq. 10: losses.total_loss)
composed = True                  # L_mask^c on; False = the paper's "w/o CP" ablation
masked = True                    # eq. 4-6 compare inside the masks; False: over the whole photo (the baselines)
prior_prompt = ""                # prior preservation (DreamBooth, Custom Diffusion): the class prompt; "" = off
prior_images = 200               # class images, drawn once by the base model (fixed seeds), in out_dir/class_images
lambda_prior = 1.0               # the prior term's weight (DreamBooth, Custom Diffusion: 1.0)
lambda_attn = 2.5                # eq. 8 weight; 0 = the paper's "w/o AR" ablation
lambda_id = 1.0                  # eq. 7 weight (paper 1.0; official script 0.25)
t_id_max = 800                   # official code: the identity loss draws its own t < 800 (paper: T' < T)
phase2_t_max = 1000              # phase-2 timesteps t < this in every pass (paper: uniform over all T = 1000;
                                 # official t_mutliplier 0.8: 800)
attn_resolutions = (16,)         # feature-map sides recorded for eq. 8 (official: 16x16 at 512 px)
style_boost = 1.0                # official code: 2.0 on the style and composed losses in each phase's first half
id_target = "mean"               # eq. 7's R(B(I_s)): "mean" of all source photos' embeddings, or "own" (official):
                                 # a source sample's own photo, a composed sample its paired source photo
id_on_source = False             # eq. 7 on source samples too (official); the paper applies it to the composed
                                 # sample only: x0_hat from the reference latent under the composed prompt
id_batch_size = 1                # eq. 7's images decoded with gradient at once (None: all of a micro-step's), each
                                 # batch backpropagated before the next: the decode, most of phase 2's memory at
                                 # 512 px, is held for this many images only; the gradient is the same
id_decode_fp32 = False           # official: decode x0_hat in fp32 and clamp it to the image range before the
                                 # detector and ArcFace (False: the compute dtype, unclamped)
latent_mask = "bilinear"         # masks to latent size: "bilinear" (soft edges), or "nearest" (official: hard
                                 # edges, then (m + 0.01) / max, a 1% weight left outside the region)
# general objects (the supplement's "General Object"): subject="object" learns any object's structure as <v1>
# and a reference's texture as <v2>: masks from <name>_mask.png (else the whole photo), no face models, no
# identity loss, the reference unmasked, and the composed prompt trained with DINO losses on x0_hat (eq. 11)
subject = "face"                 # "face" (portraits) or "object"
lambda_ssim = 0.1                # eq. 11 weights (supplement): DINO key self-similarity to the source photo,
lambda_contra = 0.2              # patch-wise contrast of those keys,
lambda_style = 2.0               # and the [CLS] token against the reference photo's
dino_model = "facebook/dino-vitb8"
dino_size = 224                  # DINO's input side
# faces: "" takes the file from the Hub repo facefusion/models-3.0.0 (InsightFace detector and ArcFace,
# BiSeNet parser); or a local .onnx
detector_model = ""
recognizer_model = ""
parser_model = ""
source_face_crop = False         # crop each source photo to a square around its face before resizing; off, each
                                 # photo is centre-cropped whole (official dataset.py). References always are:
                                 # their framing, clothes and background are what <v2> and eq. 6 learn from
face_margin = 1.0                # source_face_crop's side = face size * (1 + 2 * face_margin), as far as it fits
mask_classes = tuple(range(1, 14))  # BiSeNet classes of the paper's face region: skin, brows, eyes, glasses,
                                    # ears, earring, nose, mouth, lips (add 17 for hair)
min_mask_fraction = 0.005        # a face mask must cover more than this and less than 1 - this of its photo
hflip = False                    # official: flip each sample horizontally with probability 1/2 (faces are not
                                 # symmetric, so off in the paper's settings)
color_jitter = 0.0               # official: ColorJitter(brightness=0.1, contrast=0.1) on each sample
# optimisation
grad_accum = 4                   # paper: batch 1, gradient accumulation 4
batch_size = 1                   # draws of a source and a reference photo (and their tasks) run as one UNet pass;
                                 # batch_size=4, grad_accum=1 gives the paper's batch of 4 in one pass per step. A
                                 # pass that runs out of GPU memory is redone as more passes of fewer draws (one
                                 # process; the same draws and expected update), and so are the phase's next steps
phase1_batch_size = None         # phase 1's draws per pass (None: batch_size), with as many micro-steps as keep
                                 # its step's batch_size * grad_accum draws; phase 1 (no eq. 7, no attention maps)
                                 # needs far less memory per draw than phase 2
weight_decay = 1e-3              # AdamW, on LoRA (official) and weights trained in full; embeddings have none
grad_clip = 1.0                  # max gradient norm (official: 1.0)
grad_clip_phase1 = True          # also clip in phase 1 (official: phase 2 only)
clip_ti_decay = False            # official --clip_ti_decay: after each phase-1 step, pull the norms of <v1> and <v2>
                                 # toward 0.4 by min(1, 100 * lr)
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bf16" if torch.cuda.is_available() else "fp32"  # compute dtype of the frozen parts: fp32, bf16, fp16
gradient_checkpointing = False
compile = False                  # torch.compile the UNet (and the identity loss's VAE decode): slow first steps
                                 # while it compiles, then faster ones; the recorded attention keeps its gradient
# logging, evaluation, checkpoints
log_interval = 10
eval_interval = 250
eval_seeds = (0, 1)
eval_steps = 30                  # DDIM steps for validation samples
ckpt_interval = 250
keep_checkpoints = 2
resume = False                   # continue the run in out_dir from its last checkpoint
overwrite = False                # delete the run in out_dir (checkpoints, samples, log, weights) and start over
# -----------------------------------------------------------------------------
config = configure(globals(), nullable=("id_batch_size",))  # id_batch_size=None: all at once
if hasattr(sys.stdout, "reconfigure"):  # a file name that is not valid UTF-8 prints escaped instead of crashing a print
    sys.stdout.reconfigure(errors="backslashreplace")
check_choice("dtype", dtype, DTYPES)
check_choice("id_target", id_target, ("mean", "own"))
check_choice("latent_mask", latent_mask, ("bilinear", "nearest"))
check_choice("subject", subject, ("face", "object"))
if subject == "object" and (lambda_id > 0 or source_face_crop):
    raise SystemExit("subject=object has no faces: set lambda_id=0 and source_face_crop=False (config/object.py does; "
                     "config/tiny_object.py goes after config/tiny.py)")
if subject == "object" and (hflip or color_jitter > 0):  # eq. 11's structure target is the photo as it is
    raise SystemExit("subject=object compares each composed sample with its source photo's DINO keys, computed once "
                     "from the photo as it is: a flipped or jittered sample would be pulled toward the unflipped "
                     "photo. Set hflip=False and color_jitter=0")
device = check_device(device)
if len(tokens) != 2 or tokens[0] == tokens[1] or not (
        phase1_steps >= 0 and phase2_steps >= 0 and phase1_steps + phase2_steps > 0
        and grad_accum >= 1 and batch_size >= 1 and keep_checkpoints >= 1):
    raise SystemExit("tokens must be two different strings; phase steps >= 0, and > 0 together; grad_accum, "
                     "batch_size and keep_checkpoints >= 1")
for name, templates, n in (("source_templates", source_templates, 1), ("reference_templates", reference_templates, 1),
                           ("composed_templates", composed_templates, 2)):
    if not templates or any(t.count("{}") != n for t in templates):  # each {} takes a token, in order
        raise SystemExit(f"{name} must be one or more prompts with {n} {{}} each (where the "
                         f"token{'s go' if n > 1 else ' goes'}), got {templates!r}")
draws = batch_size * grad_accum  # a step's draws, in both phases
if phase1_batch_size is not None and not (isinstance(phase1_batch_size, int) and phase1_batch_size >= 1
                                          and draws % phase1_batch_size == 0):
    raise SystemExit(f"phase1_batch_size={phase1_batch_size!r} must divide a step's batch_size * grad_accum = {draws} "
                     "draws (or be None: batch_size)")
micro_batch = {1: phase1_batch_size or batch_size, 2: batch_size}  # phase -> draws per micro-step
accum = {phase: draws // n for phase, n in micro_batch.items()}  # phase -> micro-steps per step
if resolution % 64 or resolution < 64:
    raise SystemExit(f"resolution must be a multiple of 64, got {resolution}")
for name in ("log_interval", "eval_interval", "ckpt_interval", "eval_steps", "lora_rank"):
    if not globals()[name] >= 1:
        raise SystemExit(f"{name} must be >= 1, got {globals()[name]}")
if not (eval_seeds and all(isinstance(s, int) for s in eval_seeds)):
    raise SystemExit(f"eval_seeds must be a tuple of one or more integer seeds, e.g. (0, 1), got {eval_seeds!r}")
for name in ("lr_embed1", "lr_embed2", "lr_lora", "lr_lora_text", "lr_full"):
    if not globals()[name] >= 0:
        raise SystemExit(f"{name} must be >= 0, got {globals()[name]}")
if not (1 < t_id_max <= 1000 and 0 < phase2_t_max <= 1000):
    raise SystemExit(f"t_id_max must be in 2..1000 and phase2_t_max in 1..1000, got {t_id_max} and {phase2_t_max}")
if id_batch_size is not None and not (isinstance(id_batch_size, int) and id_batch_size >= 1):
    raise SystemExit(f"id_batch_size must be None (all at once) or >= 1, got {id_batch_size!r}")
if lambda_id > 0 and phase2_steps and not (composed or id_on_source):
    raise SystemExit("lambda_id > 0 has no sample to act on: eq. 7 is part of composed prompt learning (composed=True),"
                     " or runs on source samples with id_on_source=True (official); else set lambda_id=0")
if save_pipeline and (lora_targets or lora_text_encoder):  # its folder would hold base weights beside the LoRA
    raise SystemExit("save_pipeline writes the model trained in full (full_targets, DreamBooth), and a LoRA run's "
                     "result is its LoRA file: set lora_targets=() and lora_text_encoder=False, or save_pipeline=False")
if prior_prompt and prior_images < 1:
    raise SystemExit(f"prior preservation needs prior_images >= 1, got {prior_images}")
if not 0 <= min_mask_fraction < 0.5:
    raise SystemExit(f"min_mask_fraction must be in [0, 0.5), got {min_mask_fraction}")
if resume and overwrite:
    raise SystemExit("--resume continues the run in out_dir, --overwrite deletes it: give one of them")
ptdtype = DTYPES[dtype]
# several processes (torchrun --nproc_per_node=N): each takes every N-th micro-step of a step, the gradients are
# summed across them before the optimiser step, and only the first (rank 0) reads nothing twice and writes files
world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
master = rank == 0
if world > 1 and device.startswith("cuda"):
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"  # one GPU per process
if torch.device(device).type == "cuda" and torch.device(device).index is not None:
    torch.cuda.set_device(device)  # cuda:N the current GPU: where onnxruntime's face models go too (faces.session)
if world > 1:
    import torch.distributed as dist
    if any(n % world for n in accum.values()):
        raise SystemExit(f"the micro-steps of a step ({accum[1]} in phase 1, {accum[2]} in phase 2: grad_accum, and "
                         f"phase1_batch_size) must be a multiple of the {world} processes: each takes an equal share")
    # the others wait at the next collective while the first process validates and checkpoints: an hour, not
    # NCCL's default 10 minutes, before a wait counts as a hang
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=datetime.timedelta(hours=1))
    # Ctrl-C is agreed on after every step in host memory (gloo): a flag on the GPU would make the host wait for it
    host_group = dist.new_group(backend="gloo") if device.startswith("cuda") else None
total_steps = phase1_steps + phase2_steps

# -----------------------------------------------------------------------------
# out_dir: continue its run (--resume), clear it (--overwrite), or start in a folder without a run.
# Checked before anything is read or written; an old run is cleared (--overwrite) only once the photos, the models
# and the class images are ready, so a wrong command loses nothing but the mask overlays it redraws.
ckpt_dir = os.path.join(out_dir, "checkpoints")
log_path = os.path.join(out_dir, "log.jsonl")
RUN_FILES = ("config.json", "log.jsonl", "loss.png", lora.LORA_FILE, lora.EMBEDS_FILE, lora.KOHYA_FILE,
             lora.WEIGHTS_FILE)
RUN_DIRS = ("checkpoints", "samples", "masks", lora.EMBEDS_DIR, "pipeline")
# What a resumed run may change: where the models are, how a step's draws are laid out and computed (the same
# batch_size * grad_accum draws and expected update), and what is logged, drawn and kept. Every other setting
# defines the run, its photo folders too: the steps resumed under another value would belong to neither run.
RESUMABLE = {"synthetic_data", "out_dir", "variant", "detector_model",
             "recognizer_model", "parser_model", "min_mask_fraction", "neutral_prompt", "save_pipeline", "batch_size",
             "grad_accum", "phase1_batch_size", "id_batch_size", "device", "gradient_checkpointing", "compile",
             "log_interval", "eval_interval", "eval_seeds", "eval_steps", "ckpt_interval", "keep_checkpoints",
             "resume", "overwrite"}

def checkpoints():
    return sorted(glob.glob(os.path.join(ckpt_dir, "step*.pt")))

def checkpoint_path(step):
    return os.path.join(ckpt_dir, f"step{step:06d}.pt")

def append_log(row):
    try:
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        kept = checkpoints()
        raise SystemExit(f"could not write to {log_path} (disk full?): {e.strerror}. "
                         + (f"The last checkpoint is {kept[-1]}: free some space and run again with --resume."
                            if kept else "No checkpoint was written yet."))

def read_run_id():
    """config.json's run id: None without the file, "unreadable" where a write cut it short (before config.json
    was written whole)."""
    path = os.path.join(out_dir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f).get("run_id")
    except (OSError, ValueError):
        return "unreadable"

def clear_out_dir(names):
    """A new run's start: the files and folders `names` of an earlier run in out_dir go (--overwrite, or a run that
    never logged a step: it stopped at the data checks, leaving masks/ and config.json)."""
    try:
        for name in names:
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    except OSError as e:
        raise SystemExit(f"cannot clear {path} in out_dir {out_dir}: {e.strerror}. Pick a folder you can write "
                         "to (--out_dir=...), or fix its permissions.")

def unwritable(error):
    return SystemExit(f"cannot write to out_dir {out_dir}: {error.strerror}. Pick a folder you can write to "
                      "(--out_dir=...) with room for the checkpoints.")

def lock_out_dir():
    """One train.py at a time in out_dir: a second one there (a forgotten terminal, a study started twice) would
    interleave its checkpoints and log lines with the first's, or --overwrite them. An flock on out_dir/.lock,
    held by the first process of a run until it ends, however it ends; none where the system has no flock."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    if resume and not os.path.isdir(out_dir):  # nothing there to resume (said below), nor to lock
        return None
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(os.path.join(out_dir, ".lock"), "a")  # (not "w": it would touch an unchanged folder)
    except OSError as e:
        raise unwritable(e)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"{out_dir} is in use: another train.py is running there (it holds {out_dir}/.lock). Let it "
                         "end or stop it, or pick another --out_dir.") from None
    except OSError:  # a file system without locks: go on without one
        pass
    return f

out_lock = lock_out_dir() if master else None  # kept open for the whole run (a torchrun's processes share the folder)
ckpt = None
if resume:
    found = checkpoints()
    if not found:
        raise SystemExit(f"--resume: no checkpoint in {ckpt_dir}"
                         + ("; the run there stopped before its first one: start it again with --overwrite"
                            if os.path.exists(log_path) else "; to start a new run there, leave out --resume"))
    for path in found[::-1]:  # the newest that reads: one cut short by a power cut or a kill is passed over
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
            break
        except Exception as e:
            print(f"warning: cannot read {path} ({type(e).__name__}: {e}); trying the one before")
    if ckpt is None:
        raise SystemExit(f"--resume: none of the checkpoints in {ckpt_dir} can be read; start over with --overwrite")
    if read_run_id() == "unreadable":  # the checkpoint holds the run's id and settings: config.json is written anew
        print(f"warning: {out_dir}/config.json cannot be read; it is written again, with the run id in {path}")
    elif ckpt.get("run_id") != read_run_id():
        raise SystemExit(f"--resume: {path} belongs to another run than {out_dir}/config.json (run ids "
                         f"{ckpt.get('run_id')} and {read_run_id()}); a folder must hold one run. Move the "
                         "checkpoint back where it came from, or start over with --overwrite.")
    was = dict(ckpt["config"], draws=ckpt["config"]["batch_size"] * ckpt["config"]["grad_accum"])
    now = dict(config, draws=draws)
    changed = [f"  {k}: {json.dumps(was[k])} -> {json.dumps(now[k])}" for k in now
               if k not in RESUMABLE and k in was and json.dumps(was[k]) != json.dumps(now[k])]
    if changed:
        raise SystemExit(f"--resume: the run in {out_dir} has other settings (the run's -> now; draws is "
                         "batch_size * grad_accum):\n" + "\n".join(changed) + f"\nResume with the run's settings (all "
                         f"in {out_dir}/config.json), or start a new run with --overwrite or another --out_dir.")
    run_id = ckpt["run_id"]
    if world == 1 and all(was.get(k) == now[k] for k in ("batch_size", "phase1_batch_size")):
        # a run that ran out of GPU memory went on in smaller passes (fewer_draws_per_pass): so does its resumption
        micro_batch.update(ckpt.get("passes", {}))
        accum.update({phase: draws // n for phase, n in micro_batch.items()})
    print(f"resuming from {path} at step {ckpt['step']}"
          + (" (the run's last: its outputs are written again)" if ckpt["step"] == total_steps else ""))
else:
    if master:  # the others write nothing
        held = [n for n in ("log.jsonl", lora.LORA_FILE, lora.EMBEDS_FILE) if os.path.exists(os.path.join(out_dir, n))]
        held += [f"{len(checkpoints())} checkpoints"] if checkpoints() else []
        if held and not overwrite:
            raise SystemExit(f"{out_dir} holds a run ({', '.join(held)}). Continue it with --resume, delete it and "
                             "start over with --overwrite, or pick another --out_dir.")
    run_id = uuid.uuid4().hex[:12]  # ties the checkpoints to this run's config.json
try:
    os.makedirs(out_dir, exist_ok=True)
    probe = os.path.join(out_dir, f".write_test{rank}")
    with open(probe, "w") as f:
        f.write("ok")
    os.remove(probe)
except OSError as e:
    raise unwritable(e)

# -----------------------------------------------------------------------------
# data: read, check, crop, masks; all before any model loads
if synthetic_data:
    data.make_synthetic(source_dir, reference_dir, objects=subject == "object")
if os.path.realpath(source_dir) == os.path.realpath(reference_dir):
    raise SystemExit(f"source_dir and reference_dir are both {source_dir}: the person's photos and the style's "
                     "go in two folders of their own")
loaded, problems = [], []
for folder in (source_dir, reference_dir):  # both folders' problems in one message
    try:
        loaded.append(data.load_folder(folder))
    except SystemExit as e:
        problems.append(str(e))
if problems:
    raise SystemExit("\n".join(problems))
sources, references = loaded
photos = sources + references
# the photos by content: a resumed run refuses others (its steps would belong to neither run's photos)
photo_digests = data.digests({"source": [p.path for p in sources], "reference": [p.path for p in references]})
if ckpt is not None and ckpt.get("photos", photo_digests) != photo_digests:
    raise SystemExit(f"--resume: the photos differ from the run's in {out_dir} (a photo or its mask):\n"
                     + "\n".join(data.digest_changes(ckpt["photos"], photo_digests)) + "\nPut the run's photos "
                     "back, or start a new run with --overwrite or another --out_dir.")
unmasked = [p.path for p in photos if p.mask_photo is None]
if subject == "object":  # no parser for objects: a photo without a mask is all object (the references' always are)
    whole = [p.path for p in sources if p.mask_photo is None]
    if whole:
        print("warning: no <name>_mask.png for " + ", ".join(whole) + ": the whole photo counts as the object")
    unmasked = []
need = {"detector": source_face_crop or lambda_id > 0 or bool(unmasked),
        "parser": bool(unmasked), "recognizer": lambda_id > 0}
face_files = {}  # kind -> local .onnx path
if any(need.values()):
    import faces
    why = [w for w, on in (("face crops (source_face_crop=True)", source_face_crop),
                           ("the identity loss (lambda_id > 0)", lambda_id > 0),
                           (f"masks of {len(unmasked)} photos without <name>_mask.png", unmasked)) if on]
    print(f"face models needed for {', '.join(why)}")
    try:
        chosen = dict(detector=detector_model, parser=parser_model, recognizer=recognizer_model)
        face_files = faces.model_paths({k: chosen[k] or None for k, on in need.items() if on})
    except faces.MissingModel as e:
        listed = "".join(f"\n  {p}" for p in unmasked)
        photos_hint = (f" Photos without a mask:{listed}\nor give each a <name>_mask.png (white = face)."
                       if unmasked else "")
        raise SystemExit(f"{e}\nThe face models are needed for {', '.join(why)}.{photos_hint}")

def detect_photo_faces(photos):
    """Each photo's largest face, checked; detections cached in out_dir/faces.json (a resumed run reuses them)."""
    cache_path = os.path.join(out_dir, "faces.json")
    cache = {}
    if os.path.exists(cache_path):
        try:
            with open(cache_path) as f:
                cache = json.load(f)
        except (OSError, ValueError) as e:  # cut short by a full disk or a kill: detect again
            print(f"warning: {cache_path} is unreadable ({e}); the faces are detected again")
    none = []
    for p in photos:
        st = os.stat(p.path)
        key = f"{os.path.abspath(p.path)}|{st.st_size}|{st.st_mtime_ns}|{detector_model}"
        if key not in cache:
            cache[key] = [dict(box=f.box.tolist(), score=float(f.score), landmarks=f.landmarks.tolist())
                          for f in faces.detect(np.asarray(p.photo), model=face_files["detector"])]
        found = [faces.Face(np.array(d["box"], np.float32), d["score"], np.array(d["landmarks"], np.float32))
                 for d in cache[key]]
        if not found:
            none.append(p.path)
            continue
        if len(found) > 1:
            print(f"{p.path}: {len(found)} faces; using the largest")
        p.face = face = faces.largest(found)
        (x1, y1, x2, y2), (w, h) = face.box, p.photo.size
        if max(x2 - x1, y2 - y1) < max(64, 0.1 * min(w, h)):
            print(f"warning: {p.path}: the face is only {max(x2 - x1, y2 - y1):.0f} px across; "
                  "closer photos teach the identity better")
        if x1 < 1 or y1 < 1 or x2 > w - 1 or y2 > h - 1:
            print(f"warning: {p.path}: the face is cut off at the photo's border")
    if master:
        data.write_whole(cache_path, json.dumps(cache))
    if none:
        raise SystemExit("no face found in:\n  " + "\n  ".join(none) + "\nA usable photo shows one person's face "
                         "from the front or three-quarter view, unobstructed, at least ~100 pixels across.")

def face_in_crop(face, square):
    """The face's box and landmarks in the coordinates of the cropped, resized photo."""
    left, top, side = square
    k = resolution / side
    shift = np.array([left, top], np.float32)
    return faces.Face(((face.box.reshape(2, 2) - shift) * k).reshape(4), face.score, (face.landmarks - shift) * k)

if "detector" in face_files:  # the photos whose face is used: for its mask, its crop, or eq. 7's target identity
    detect_photo_faces([p for p in photos if p.path in unmasked or (p in sources and (source_face_crop or lambda_id > 0))])
outside = []
for p in photos:
    around = p.face.box if source_face_crop and p in sources else None  # None: the whole photo, centred
    data.crop(p, data.square_around(p.photo.size, around, face_margin), resolution)
    if p.square[2] < resolution / 1.5:  # enlarged more than 1.5x: the model learns the blur as the look of the photo
        print(f"warning: {p.path}: a {p.square[2]} px square is enlarged to {resolution} px; a sharper or larger "
              f"photo (its short side at least {resolution} px) teaches a sharper result")
    if p.face is not None:
        p.face = face_in_crop(p.face, p.square)
        if p.face.landmarks.min() < 0 or p.face.landmarks.max() > resolution:  # eyes, nose or mouth cut away
            outside.append(p.path)
            continue
        if p.face.box.min() < 0 or p.face.box.max() > resolution:
            print(f"warning: {p.path}: the face reaches past the edge of the square the photo is cropped to")
    if p.mask is None and subject == "object":
        p.mask = torch.ones(1, resolution, resolution)
    elif p.mask is None:  # the paper's face region from the parser, inside the detected box
        m = faces.face_mask(data.to_uint8(p.image / 2 + 0.5), p.face, model=face_files["parser"], classes=mask_classes)
        p.mask = torch.from_numpy(np.asarray(m, np.float32))[None]
if outside:
    raise SystemExit("the face is not inside the square these photos are cropped to (the largest centred square, "
                     "or with source_face_crop=True a source's square around its face):\n  " + "\n  ".join(outside) +
                     "\nCrop each photo yourself so that the face sits well inside its centred square"
                     + (", or set --source_face_crop=True to crop the sources around their faces"
                        if not source_face_crop and any(p.path in outside for p in sources) else "")
                     + ".")
os.makedirs(os.path.join(out_dir, "masks"), exist_ok=True)
overlays = set()  # drawn before the check below, so a bad mask can be seen; an earlier run's others go later
for kind, group in (("source", sources), ("reference", references)) if master else ():
    for p in group:
        name = f"{kind}_{os.path.splitext(os.path.basename(p.path))[0]}.png"
        overlays.add(name)
        data.save_overlay(p, p.mask, os.path.join(out_dir, "masks", name))
data.check_masks(photos if subject == "face" else [p for p in sources if p.mask_photo is not None],
                 min_mask_fraction, objects=subject == "object")
if master:  # (the others drew none)
    print(f"{len(sources)} source and {len(references)} reference photos; masks drawn in {out_dir}/masks")

# -----------------------------------------------------------------------------
# model, and the placeholder tokens: new rows of the embedding table, trained as one small fp32 parameter
try:
    sd = StableDiffusion.from_pretrained(init_from, device=device, dtype=ptdtype, variant=variant)
except (FileNotFoundError, RuntimeError, ValueError) as e:  # not found, not fetched, not a pipeline model.py reads
    raise SystemExit(str(e))
if sd.is_xl and dtype == "fp16" and sd.vae.config.force_upcast:
    raise SystemExit("SDXL's VAE overflows in fp16 (its config says force_upcast): train with dtype=bf16 or fp32")
if phase2_steps and lora_targets and not lora.targets(sd.unet, lora_targets):  # checked now, not after phase 1
    raise SystemExit(f"lora_targets={lora_targets} matches no nn.Linear of the UNet; the names look like "
                     "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
attn_sides = sd.unet.cross_attention_sides(resolution // 8)  # eq. 8 and validation read those in attn_resolutions
if attn_resolutions and not set(attn_resolutions) & set(attn_sides):
    raise SystemExit(f"attn_resolutions={attn_resolutions} matches no cross-attention layer at resolution "
                     f"{resolution}: its maps are {attn_sides} on a side (pick from those)")
sd.unet.gradient_checkpointing = sd.vae.gradient_checkpointing = gradient_checkpointing
if compile:  # in place, so parameter names and checkpoints are unchanged; LoRA added later recompiles once.
    sd.unet.compile(dynamic=False)  # static shapes: one graph per batch size a run uses (at most 4), none symbolic

def eager():
    """Where compile is on, run what is inside without compiling (sampling, FLOP counts)."""
    return torch.compiler.set_stance("force_eager") if compile else contextlib.nullcontext()

# the frozen weights are in dtype, the trained ones fp32: autocast runs each op in dtype (on any device)
autocast = torch.autocast(device_type=torch.device(device).type, dtype=ptdtype, enabled=dtype != "fp32")
scaler = torch.amp.GradScaler(torch.device(device).type, enabled=(dtype == "fp16"))  # fp16 needs loss scaling
T = sd.schedule.config.num_train_timesteps
scale_factor = sd.vae.config.scaling_factor

# SDXL has two text encoders, each with its tokenizer (the same vocabulary): the tokens are learned in both,
# as one row of the two widths side by side (768; SDXL 768 + 1280)
encoders = {"text_encoder": sd.text_encoder} | ({"text_encoder_2": sd.text_encoder_2} if sd.is_xl else {})
tokenizers = [sd.tokenizer] + ([sd.tokenizer_2] if sd.is_xl else [])
ids = [lora.add_tokens(tokenizer, m, list(tokens)) for tokenizer, m in zip(tokenizers, encoders.values())]
assert all(i == ids[0] for i in ids), f"the tokenizers gave the placeholders different ids: {ids}"
ids = ids[0]
tables = [m.text_model.embeddings.token_embedding for m in encoders.values()]
widths = [table.embedding_dim for table in tables]
embeds = torch.empty(2, sum(widths), device=device)
init_ids = sd.tokenizer([init_v1, init_v2])
for i, word in enumerate((init_v1, init_v2)):
    if word:
        word_ids = init_ids[i][1:][init_ids[i][1:] != sd.tokenizer.eos_id]
        if len(word_ids) != 1:
            raise SystemExit(f"init word {word!r} is {len(word_ids)} tokens; pick a word that is one token")
        embeds[i] = torch.cat([table.weight[word_ids[0]].float() for table in tables])
    else:
        noise = torch.randn(sum(widths), generator=torch.Generator().manual_seed(seed))
        embeds[i] = noise.to(device) * 0.017  # official code's std
embeds = torch.nn.Parameter(embeds)

def use_learned_rows(columns):
    def hook(module, args, out):
        # the token lookup returns our fp32 rows for the placeholder ids: every other row stays untouched
        tok = args[0]
        new = (tok >= ids[0]) & (tok <= ids[1])
        return torch.where(new[..., None], embeds[(tok - ids[0]).clamp(0, 1), columns].to(out.dtype), out)
    return hook

for table, start in zip(tables, np.cumsum([0] + widths)):
    table.register_forward_hook(use_learned_rows(slice(int(start), int(start) + table.embedding_dim)))

def condition(prompts):
    """What the UNet is conditioned on, with gradient to the learned rows: (context, added_cond); added_cond is
    SDXL's pooled text and size conditioning (the training resolution as original and target size, no crop, as
    sample() conditions), None for SD1.5."""
    if not sd.is_xl:
        return sd.encode_prompts(prompts), None
    return sd.encode_prompts(prompts, original_size=(resolution, resolution), target_size=(resolution, resolution))

def rows_of(added, sel):
    return None if added is None else {k: v[sel] for k, v in added.items()}

def per_encoder(rows):
    """A learned row as save_result takes it: the vector (SD1.5), or one per text encoder (SDXL)."""
    parts = rows.detach().split(widths, dim=-1)
    return tuple(parts) if sd.is_xl else parts[0]

# the parameters trained in full in phase 2 (the baselines), by name: "unet.<name>" or "text_encoder.<name>"
full_params = {f"{prefix}.{n}": p for prefix, m in dict(unet=sd.unet, **encoders).items()
               for n, p in m.named_parameters() if any(re.fullmatch(t, f"{prefix}.{n}") for t in full_targets)}
if full_targets and not full_params:
    raise SystemExit(f"full_targets={full_targets} matches no parameter; the names look like "
                     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")

val_prompts = [composed_templates[0].format(*tokens), source_templates[0].format(tokens[0]),
               reference_templates[0].format(tokens[1]), neutral_prompt]
try:  # a placeholder past CLIP's 77 tokens would be cut off without a word
    sd.tokenizer.check_length([t.format(*tokens) for t in composed_templates] + val_prompts
                              + [t.format(tokens[0]) for t in source_templates]
                              + [t.format(tokens[1]) for t in reference_templates])
except ValueError as e:
    raise SystemExit(f"{e}\nShorten that template.")

# the photos as the VAE sees them: posterior mean and std (cached), masks at latent size
@torch.no_grad()
def encode(images):
    mean, logvar = sd.vae.encode(to_device(images, device).to(ptdtype))  # (per draw with hflip / color_jitter)
    return mean.float(), (0.5 * logvar.float()).exp()

def to_latent(m):
    """(N, 1, R, R) masks -> (N, 1, R/8, R/8). The official code takes the nearest pixel and then
    (m + 0.01) / max, which leaves hard edges and a 1% weight outside the region; bilinear leaves soft
    edges (the mean of each 8x8 block's 4 central pixels) and exactly 0 outside."""
    size = (resolution // 8,) * 2
    if latent_mask == "nearest":
        m = F.interpolate(m, size=size, mode="nearest") + 0.01
        return (m / m.amax(dim=(1, 2, 3), keepdim=True)).to(device)
    return F.interpolate(m, size=size, mode="bilinear").to(device)

src_mean, src_std = encode(torch.stack([p.image for p in sources]))
ref_mean, ref_std = encode(torch.stack([p.image for p in references]))
src_face = to_latent(torch.stack([p.mask for p in sources]))          # M_s of eq. 4
ref_face = to_latent(torch.stack([p.mask for p in references]))       # <v1>'s region on a reference (eq. 8)
ref_rest = to_latent(1 - torch.stack([p.mask for p in references]))   # M_r of eq. 5-6: everything but the face
if subject == "object":  # the whole reference photo is the texture: plain L^r, and <v2> may attend anywhere
    ref_rest = torch.ones_like(ref_rest)

if subject == "object":  # eq. 11: a frozen DINO ViT, and what x0_hat is compared with
    dino = ViT.from_pretrained(dino_model, device=device, dtype=ptdtype)

    def dino_features(images):
        """(B, 3, R, R) images in [-1, 1] -> DINO's last block output (B, 1 + N, D), before the final layernorm,
        and its keys, as DiffuseIT reads both. x0_hat is not clamped to the image range (DiffuseIT's neither):
        its pixels past it keep their gradient."""
        return dino.last_block(dino_preprocess(images.float() / 2 + 0.5, dino_size))

    with torch.no_grad(), autocast:
        src_keys = dino_features(torch.stack([p.image for p in sources]).to(device))[1].float()  # structure
        ref_cls = dino_features(torch.stack([p.image for p in references]).to(device))[0][:, 0].float()  # texture

@torch.no_grad()
def class_images():
    """Prior preservation's class images: prior_prompt drawn by the base model before any training, image i
    from seed i (DDIM, 50 steps, guidance 7.5), kept in out_dir/class_images so a resumed or repeated run
    reuses them; -> (N, 3, R, R) in [-1, 1]."""
    folder = os.path.join(out_dir, "class_images")
    os.makedirs(folder, exist_ok=True)
    made_with = dict(prompt=prior_prompt, init_from=init_from, resolution=resolution)
    record = os.path.join(folder, "class_images.json")
    paths = [os.path.join(folder, f"{i:04d}.png") for i in range(prior_images)]
    try:
        with open(record) as f:
            drawn_with = json.load(f)
    except (OSError, ValueError):  # none yet, or cut short by a full disk or a kill: drawn anew
        drawn_with = None
    if master and drawn_with != made_with:  # other settings' images, or none: draw anew
        for old in glob.glob(os.path.join(folder, "*.png")):
            os.remove(old)
        data.write_whole(record, json.dumps(made_with))
    if world > 1:
        dist.barrier()
    # each process draws its share (image i from seed i, whichever draws it), then all read them all
    mine = [i for i in range(rank, prior_images, world) if not os.path.exists(paths[i])]
    from tqdm import tqdm
    for i in tqdm(mine, desc=f"class images for '{prior_prompt}'", unit="image", disable=not (master and mine)):
        with eager():  # drawn once: compiling a graph for them would cost more than it saves
            image = sd.sample([prior_prompt], steps=50, guidance=7.5, seed=i, height=resolution, width=resolution)
        data.save_png(image[0].cpu(), paths[i])
    if world > 1:
        dist.barrier()
    return torch.stack([data.to_tensor(data.read_rgb(path)) * 2 - 1 for path in paths])

if prior_prompt:
    prior_mean, prior_std = encode(class_images())

if lambda_id > 0:  # the ArcFace eq. 7 backpropagates through, and each source photo's identity R(B(I_s))
    arcface = faces.arcface_torch(face_files["recognizer"]).to(device).eval().requires_grad_(False)
    with torch.no_grad():
        crops = faces.arcface_crop(torch.stack([p.image for p in sources]).float().to(device),
                                   [p.face.landmarks for p in sources])
        src_ids = F.normalize(arcface(crops), dim=-1)  # (N, 512), one per source photo
        src_id = F.normalize(src_ids.mean(0), dim=-1)  # their mean identity
    # id_decode_fp32: the official code decodes x0_hat with its fp32 VAE; ours may be bf16, so keep an fp32 copy
    id_vae = copy.deepcopy(sd.vae).float() if id_decode_fp32 and ptdtype != torch.float32 else sd.vae
    try:  # the detector as torch ops on the training device: no copy to the host for each decoded x0_hat
        detector = faces.detector_torch(face_files["detector"]).to(device)
    except (NotImplementedError, RuntimeError) as e:
        detector = None
        print(f"faces: the identity loss's detector runs with onnxruntime on the host ({e})")
    id_decode = torch.compile(id_vae.decode, dynamic=False) if compile else id_vae.decode

# -----------------------------------------------------------------------------
# one micro-step: a source and a reference photo, the prompts of the phase, the loss terms
gen = torch.Generator().manual_seed(seed)  # data order, noise and timesteps: one seed, saved in checkpoints

def rand(*shape):
    return to_device(torch.randn(*shape, generator=gen), device)

def pick(n):
    return int(torch.randint(n, (1,), generator=gen))

def prompt(templates, *words):
    return templates[pick(len(templates))].format(*words)

@dataclass
class Task:
    """One sample of a micro-step: eq. 4 (source), 5 (reference), 6 (composed; eq. 11 for objects), or a class
    image of prior preservation."""
    name: str             # "s", "r", "c" or "p": the log's loss_s, loss_r, loss_c, loss_p
    latent: torch.Tensor  # (4, h, w) clean latent z_0
    prompt: str
    loss_mask: torch.Tensor  # (1, h, w): where the noise prediction is compared
    attn_masks: tuple     # the region <v1> and <v2> may attend to (eq. 8); None: no term (not in the prompt, or free)
    weight: float         # style_boost on r and c in the first half of a phase (official code)
    source: int | None    # the source photo whose identity eq. 7 asks for (c; s too with id_on_source); None: none
    reference: int | None  # the reference photo (r and c): eq. 11's texture target for objects

augment = hflip or color_jitter > 0

@torch.no_grad()
def view(group, i, mean, std, masks):
    """Photo i of a group as a latent (a sample of the VAE posterior, scaled as the UNet sees it) with its
    masks at latent size: the cached encoding, or with hflip / color_jitter a freshly augmented and
    encoded copy, the official data set's augmentation drawn anew each time."""
    masks = [m[i] for m in masks]
    if augment:
        image = group[i].image
        if color_jitter > 0:
            image = data.color_jitter(image, color_jitter, gen)
        if hflip and torch.rand(1, generator=gen).item() < 0.5:  # the masks follow the flip
            image, masks = image.flip(-1), [m.flip(-1) for m in masks]
        (mean,), (std,) = encode(image[None])
    else:
        mean, std = mean[i], std[i]
    return (mean + std * rand(*mean.shape)) * scale_factor, masks

def draw_tasks(phase, boost):
    s, r = pick(len(sources)), pick(len(references))
    zs, (face_s,) = view(sources, s, src_mean, src_std, [src_face])
    zr, (face_r, rest_r) = view(references, r, ref_mean, ref_std, [ref_face, ref_rest])
    whole = torch.ones_like(face_s)
    tasks = [Task("s", zs, prompt(source_templates, tokens[0]), face_s if masked else whole, (face_s, None), 1.0,
                  s if id_on_source else None, None),
             Task("r", zr, prompt(reference_templates, tokens[1]), rest_r if masked else whole, (None, rest_r), boost,
                  None, r)]
    if phase == 2 and composed and subject == "face":  # the reference photo is the pseudo-label for all but the
        tasks.append(Task("c", zr, prompt(composed_templates, *tokens), rest_r, (face_r, rest_r), boost, s, r))  # face
    if phase == 2 and composed and subject == "object":  # no pseudo-label: the source's structure, eq. 11
        # <v2> may attend anywhere: no eq. 8 term, which as an all-ones mask would be a 0 halving <v1>'s mean
        tasks.append(Task("c", zs, prompt(composed_templates, *tokens), whole, (face_s, None), boost, s, r))
    if phase == 2 and prior_prompt:  # prior preservation: a class image under the class prompt, whole
        k = pick(len(prior_mean))
        zp = (prior_mean[k] + prior_std[k] * rand(*prior_mean[k].shape)) * scale_factor
        # DreamBooth's loss is the instance images' mean + lambda_prior x the class images' mean, as many of each:
        # one class image among the draw's n instance samples, all averaged, takes n x lambda_prior for that ratio
        tasks.append(Task("p", zp, prior_prompt, whole, (None, None), lambda_prior * len(tasks), None, None))
    return tasks

def draw_micro_batch(phase, boost):
    """micro_batch[phase] draws of the phase's tasks, each followed by its noise and timesteps (and eq. 7's own
    timesteps for its samples with an identity), so that a draw is the same whether it runs in a batch, in a
    micro-step of its own, or in another process -> (tasks, noise, t, t_id or None)."""
    tasks, noise, t, t_id = [], [], [], []
    for _ in range(micro_batch[phase]):
        drawn = draw_tasks(phase, boost)
        tasks += drawn
        noise.append(rand(len(drawn), *drawn[0].latent.shape))
        t.append(torch.randint(phase2_t_max if phase == 2 else T, (len(drawn),), generator=gen))
        if phase == 2 and lambda_id > 0:
            n = sum(task.source is not None for task in drawn)
            t_id.append(torch.randint(1, min(t_id_max, phase2_t_max), (n,), generator=gen))
    return tasks, torch.cat(noise), to_device(torch.cat(t), device), to_device(torch.cat(t_id), device) if t_id else None

def cut(encoded):
    """condition()'s (context, added_cond) with each tensor replaced by a leaf of the same value, where a backward
    pass stops (in the leaf's .grad) -> (the cut pair, [(tensor, its leaf)])."""
    context, added = encoded
    pairs = [(x, x.detach().requires_grad_(x.requires_grad)) for x in [context, *(added or {}).values()]]
    leaves = [leaf for _, leaf in pairs]
    return (leaves[0], None if added is None else dict(zip(added, leaves[1:]))), pairs

def micro_step(phase, boost, drawn=None, backward=None):
    """One micro-step of the phase (drawn: draw_micro_batch's, else drawn here): eq. 10 over its tasks, forward and
    backward -> (the loss, {term: value} for the log, identity samples without a detected face or None without
    eq. 7), all detached. backward(loss) backpropagates (train.py's: scaled for fp16, over accum); None:
    loss.backward(). Eq. 10 is a sum, so its two parts run one after the other, each forward then backward, and
    only one part's activations are held at a time: the UNet pass of every task (eq. 4-6, 8, 11), then eq. 7's
    (identity_part). The prompts' encodings are cut from the text encoder between them, and their gradient, the
    two parts' sum, goes back through it last."""
    backward = backward or torch.Tensor.backward
    tasks, noise, t, t_id = drawn or draw_micro_batch(phase, boost)
    z0 = torch.stack([task.latent for task in tasks])
    prompts = [task.prompt for task in tasks]
    record = phase == 2 and lambda_attn > 0
    rec = AttentionRecorder(to_device(sd.tokenizer(prompts), device), ids, attn_resolutions if record else ())  # () records nothing
    z_t = sd.schedule.add_noise(z0, noise, t)
    with autocast:  # (context, added_cond or None), with gradient to the learned rows, cut from the text encoder
        (context, added), pairs = cut(condition(prompts))
    with autocast, sd.unet.record_attention(rec):
        pred = sd.unet(z_t, t, context, added)
    parts = []  # eq. 11's terms of each composed object sample
    recon = torch.stack([object_composed_loss(z_t[i:i + 1], pred[i:i + 1], t[i:i + 1], task, parts)  # eq. 11
                         if task.name == "c" and subject == "object" else
                         masked_mse(pred[i:i + 1], noise[i:i + 1], task.loss_mask[None])  # eq. 4 (s), 5 (r), 6 (c)
                         for i, task in enumerate(tasks)])
    attn, zeros = torch.zeros_like(recon), torch.zeros_like(recon)  # eq. 8 and eq. 7 where a task has none
    terms = {name: torch.stack([recon[i] for i, task in enumerate(tasks) if task.name == name]).mean()
             for name in dict.fromkeys(task.name for task in tasks)}  # each kind of task's mean over the batch
    terms.update({k: torch.stack([p[k] for p in parts]).mean() for k in (parts[0] if parts else {})})
    if record:
        present = to_device(torch.tensor([[m is not None for m in task.attn_masks] for task in tasks]), device)
        absent = torch.zeros_like(src_face[0])  # a placeholder slot the prompt lacks: masked out by `present`
        masks = torch.stack([torch.stack([absent if m is None else m for m in task.attn_masks]) for task in tasks])
        attn = attention_refocus(rec.maps, masks[:, :, 0], present)  # eq. 8, one value per task
        terms["attn"] = attn.mean()
    weight = to_device(torch.tensor([task.weight for task in tasks]), device)
    loss = total_loss(recon, attn, zeros, weight, lambda_attn, lambda_id)  # eq. 10 without eq. 7
    backward(loss)
    loss, missed = loss.detach(), None
    if phase == 2 and lambda_id > 0:  # eq. 7 on the composed samples (and the source ones with id_on_source)
        id_loss, values, found = identity_part(tasks, z0, noise, context, added, t_id, weight, backward)
        loss, missed = loss + id_loss, (~found).sum()  # missed: read on logging steps only
        terms["id"] = values.sum() / found.sum().clamp(min=1)  # the mean over the samples with a face (0: none)
    roots = [(x, leaf.grad) for x, leaf in pairs if leaf.grad is not None]
    if roots:  # the text encoder, once, with both parts' gradient
        torch.autograd.backward(*zip(*roots))
    return loss, {k: v.detach() for k, v in terms.items()}, missed

def identity_part(tasks, z0, noise, context, added, t_id, weight, backward):
    """Eq. 10's eq. 7 part, forward and backward, on the tasks with an identity (composed samples; sources too
    with id_on_source): their second UNet pass at t_id < t_id_max, in one batch, its output cut; then
    id_batch_size images at a time, the decode with gradient, crop and ArcFace (identity_term), backpropagated
    to the cut; then the UNet pass, once. -> (the part, (B,) eq. 7 values, (B,) where a face was found), detached."""
    rows = [i for i, task in enumerate(tasks) if task.source is not None]
    sel = to_device(torch.tensor(rows), device)
    owners = to_device(torch.tensor([tasks[i].source for i in rows]), device)
    targets = src_ids[owners] if id_target == "own" else src_id.expand(len(rows), -1)
    z_t = sd.schedule.add_noise(z0[sel], noise[sel], t_id)
    with autocast:
        eps = sd.unet(z_t, t_id, context[sel], rows_of(added, sel))
    eps_cut = eps.detach().requires_grad_()
    zeros = torch.zeros(len(tasks), device=device)
    part, values, found, n = 0.0, [], [], id_batch_size or len(rows)
    for c in range(0, len(rows), n):
        v, f = identity_term(z_t[c:c + n], eps_cut[c:c + n], t_id[c:c + n], targets[c:c + n])
        id_loss = total_loss(zeros, zeros, zeros.index_put((sel[c:c + n],), v), weight, lambda_attn, lambda_id)
        backward(id_loss)
        part = part + id_loss.detach()
        values.append(v.detach())
        found.append(f)
    eps.backward(eps_cut.grad)
    return part, torch.cat(values), torch.cat(found)

def object_composed_loss(z_t, eps, t, task, parts):
    """Eq. 11 (supplement, "General Object"; after Kwon & Ye's DiffuseIT): the composed sample has no pseudo-label,
    so its x0_hat (Tweedie, from this pass), decoded with gradient, goes through DINO: the self-similarity and the
    patches of its last-layer keys against the source photo's (structure), its [CLS] token against the reference
    photo's (texture). Appends the three terms to parts (for the log); returns lambda_ssim L_ssim
    + lambda_contra L_contra + lambda_style L_style."""
    z0_hat = sd.schedule.predict_x0(z_t, eps.float(), t)
    with autocast:
        hidden, keys = dino_features(sd.vae.decode((z0_hat / scale_factor).to(ptdtype)))
    keys = keys.float()
    terms = dict(ssim=self_similarity_loss(keys, src_keys[task.source][None]).mean(),
                 contra=patch_contrastive_loss(keys, src_keys[task.source][None]).mean(),
                 style=dino_style_loss(hidden[:, 0].float(), ref_cls[task.reference][None]).mean())
    parts.append(terms)
    return lambda_ssim * terms["ssim"] + lambda_contra * terms["contra"] + lambda_style * terms["style"]

def identity_term(z_t, eps, t_id, targets):
    """Eq. 7 after its UNet pass (eps, at t_id): Tweedie's x0, decoded with gradient, cropped at the landmarks
    the detector finds on a detached copy, through ArcFace, 1 - cos to each sample's target identity
    -> ((B,) values, 0 where no face was found; (B,) bool: where one was)."""
    z0_hat = sd.schedule.predict_x0(z_t, eps.float(), t_id)
    if id_decode_fp32:  # as the official code: fp32, then clamped to the image range
        images = id_decode(z0_hat / scale_factor).float().clamp(-1, 1)
    else:
        with autocast:
            images = id_decode((z0_hat / scale_factor).to(ptdtype)).float()  # (B, 3, H, W) in about [-1, 1]
    found, landmarks = faces_on_samples(images.detach())
    # a sample without a face is cropped at the template's own points (its loss is zeroed below): its zero
    # landmarks would give a degenerate transform and a NaN crop
    template = faces.arcface_template(landmarks.device).to(landmarks.dtype)
    emb = arcface(faces.arcface_crop(images, torch.where(found[:, None, None], landmarks, template)))
    return torch.where(found, identity_loss(emb, targets), 0.0), found

def faces_on_samples(images):
    """(B, 3, H, W) in [-1, 1] -> (found (B,) bool, landmarks (B, 5, 2) of each image's largest face), on the
    device; onnxruntime on the host only where the detector's graph could not run as torch ops."""
    if detector is not None:
        return faces.detect_torch(detector, images)
    found, landmarks = torch.zeros(len(images), dtype=torch.bool), torch.zeros(len(images), 5, 2)
    for i, image in enumerate(images):
        faces_found = faces.detect(data.to_uint8(image / 2 + 0.5), model=face_files["detector"])
        if faces_found:
            found[i] = True
            landmarks[i] = torch.from_numpy(faces.largest(faces_found).landmarks)
    return found.to(images.device), landmarks.to(images.device)

# -----------------------------------------------------------------------------
# validation: fixed seeds, the four prompts, and how much each token attends outside its region
@torch.no_grad()
def evaluate(step):
    prompts = [p for p in val_prompts for _ in eval_seeds]
    latents = torch.cat([torch.randn(1, sd.vae.config.latent_channels, resolution // 8, resolution // 8,
                                     generator=torch.Generator().manual_seed(s)) for _ in val_prompts for s in eval_seeds])
    with autocast:  # trained weights are fp32 beside the frozen ones in the compute dtype; one batch, seed per image
        images = sd.sample(prompts, steps=eval_steps, latents=latents, height=resolution, width=resolution)
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    path = os.path.join(out_dir, "samples", f"step{step:05d}.png")
    data.save_labeled_grid(images.cpu(), len(eval_seeds), val_prompts, path)
    return dict(attention_on_validation(), samples=path)

@torch.no_grad()
def attention_on_validation():
    """Composed prompt on every reference photo (source photo for objects) at t=500, fixed noise.
    attn_outside: each token's mean scaled attention outside its mask (what eq. 8 lowers). attn_mass: its
    mean raw attention probability, which the min-max scaling of eq. 8 cannot see: a token can satisfy
    eq. 8 by receiving almost none."""
    g = torch.Generator().manual_seed(seed)
    # the composed prompt's photos: the references (portraits), or the sources (objects: their structure)
    if subject == "object":
        z0, regions = src_mean * scale_factor, [src_face, torch.ones_like(src_face)]
    else:
        z0, regions = ref_mean * scale_factor, [ref_face, ref_rest]
    noise = torch.randn(z0.shape, generator=g).to(device)
    t = torch.full((len(z0),), T // 2, device=device)
    prompts = [val_prompts[0]] * len(z0)
    rec = AttentionRecorder(sd.tokenizer(prompts).to(device), ids, attn_resolutions)
    with autocast, sd.unet.record_attention(rec):
        sd.unet(sd.schedule.add_noise(z0, noise, t), t, *condition(prompts))
    if not rec.maps:
        return {}
    outside = attention_outside(rec.maps, torch.stack(regions, dim=1)[:, :, 0])
    mass = torch.stack([m.float().mean(dim=(0, 1, 2, 3)) for m in rec.maps]).mean(0)
    return dict(attn_outside={tok: round(v, 5) for tok, v in zip(tokens, outside.tolist())},
                attn_mass={tok: float(f"{v:.3g}") for tok, v in zip(tokens, mass.tolist())})

# -----------------------------------------------------------------------------
# optimisers, checkpoints, outputs
def setup_phase(phase):
    """The phase's trainable parameters, AdamW, and a linear decay to 0 over the phase."""
    if phase == 1:
        groups = [dict(name="embeds", params=[embeds], lr=lr_embed1, weight_decay=0.0)]
        return make_optimizer(groups, phase1_steps)
    if lora_targets and not lora.lora_modules(sd.unet):  # LoRA's init from its own generator: same whatever ran before
        g = torch.Generator().manual_seed(seed)
        lora.inject(sd.unet, lora_targets, rank=lora_rank, alpha=lora_alpha, generator=g)
        for m in encoders.values() if lora_text_encoder else ():
            lora.inject(m, lora.OFFICIAL_TEXT_ENCODER, rank=lora_rank, alpha=lora_alpha, generator=g)
    text_lora = [p for m in encoders.values() for p in lora.lora_parameters(m)]
    for p in lora.lora_parameters(sd.unet) + text_lora + list(full_params.values()):
        p.data = p.data.float()  # trainable weights stay fp32 whatever the compute dtype
        p.requires_grad_(True)
    groups = [dict(name="embeds", params=[embeds], lr=lr_embed2, weight_decay=0.0),
              dict(name="lora", params=lora.lora_parameters(sd.unet), lr=lr_lora, weight_decay=weight_decay),
              dict(name="lora_text", params=text_lora, lr=lr_lora_text,
                   weight_decay=weight_decay),
              dict(name="full", params=list(full_params.values()), lr=lr_full, weight_decay=weight_decay)]
    return make_optimizer([g for g in groups if g["params"]], phase2_steps)

@torch.no_grad()
def pull_norms_toward(target, lam):
    """The official --clip_ti_decay: move each placeholder embedding's norm a fraction lam of the way to
    target, keeping its direction (official: target 0.4, lam = min(1, 100 * lr) after each phase-1 step); SDXL: each
    text encoder's part of the row."""
    for part in embeds.split(widths, dim=-1):  # views: copy_ writes into embeds
        norm = part.norm(dim=-1, keepdim=True)
        part.copy_(F.normalize(part, dim=-1) * (norm + lam * (target - norm)))

def make_optimizer(groups, steps):
    opt = torch.optim.AdamW(groups, fused=device.startswith("cuda"))  # fused: one kernel for all parameters
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / max(1, steps)))

def trained_tensors():
    """Every trained weight but the token rows (embeds), by name: LoRA's and those trained in full."""
    lora_weights = {f"{prefix}.{k}": v for prefix, m in dict(unet=sd.unet, **encoders).items()
                    for k, v in m.state_dict().items() if ".lora_" in k}
    return dict(lora_weights, **{k: p.data for k, p in full_params.items()})

def save_checkpoint(step, phase, gen_state=None):
    """Atomic: write to a temporary file, then rename; keep the last keep_checkpoints. gen_state: the generator's
    state to resume from, if not its current one. The first process writes them, and under torchrun any process
    whose step failed (each holds the whole state), into a temporary file of its own."""
    os.makedirs(ckpt_dir, exist_ok=True)
    state = dict(step=step, phase=phase, run_id=run_id, embeds=embeds.detach().cpu(), trained=trained_tensors(),
                 optimizer=opt.state_dict(), scheduler=sched.state_dict(), scaler=scaler.state_dict(),
                 gen=gen.get_state() if gen_state is None else gen_state, config=config, passes=dict(micro_batch),
                 photos=photo_digests)
    path = checkpoint_path(step)
    tmp = f"{path}.tmp{rank}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on the disk before the rename: a power cut leaves the old checkpoint or the new
    except (OSError, RuntimeError) as e:  # a full disk shows as RuntimeError "... file write failed"
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = checkpoints()
        raise SystemExit(f"could not write the checkpoint {path} (disk full?): {e}\n"
                         + (f"The previous checkpoint {kept[-1]} is kept; free some space and run again with "
                            "--resume." if kept else "No checkpoint was written."))
    os.replace(tmp, path)
    for old in checkpoints()[:-keep_checkpoints] + glob.glob(os.path.join(ckpt_dir, "step*.pt.tmp0")) if master else ():
        os.remove(old)  # (a .tmp0 left: a write that a kill cut short)

def keep_done(step, phase, what, gen_state=None):
    """After `what` failed: checkpoint the `step` steps done (unless that checkpoint is there) and say so."""
    if not os.path.exists(checkpoint_path(step)):
        save_checkpoint(step, phase, gen_state)
    print(f"\n{what} failed; the {step} steps done are in {checkpoints()[-1]}: fix the cause below and run again "
          "with --resume", file=sys.stderr, flush=True)

def say_memory_hint(error, phase, validation=False):
    """For a run out of GPU memory: print the settings that lower it, keeping the update."""
    if not isinstance(error, torch.OutOfMemoryError):
        return
    if validation:
        where, ways = "validation", [f"fewer seeds: it draws {len(val_prompts)} prompts x eval_seeds={eval_seeds} in "
                                     "one batch (--eval_seeds=(0,): one seed)"]
    else:
        where, ways = f"phase {phase}", []
        if phase == 2 and lambda_id > 0 and id_batch_size != 1:
            ways.append("--id_batch_size=1: eq. 7 decodes one image at a time (its decode is most of phase 2's memory)")
        if micro_batch[phase] > 1:
            how = "--phase1_batch_size" if phase == 1 else "--batch_size with a larger --grad_accum (the same product)"
            ways.append(f"a smaller {how}: more micro-steps of fewer draws, the same batch (now {accum[phase]} "
                        f"micro-step(s) of {micro_batch[phase]} draws)")
        if not gradient_checkpointing:
            ways.append("--gradient_checkpointing=True: recompute activations in the backward pass, not hold them")
    print(f"{where} ran out of GPU memory; " + ("each of these lowers it:\n  " + "\n  ".join(ways) if ways else
                                               "at its smallest settings: a GPU with more memory is needed"),
          file=sys.stderr, flush=True)

def plot_losses(log_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(log_path) as f:
        rows = [json.loads(l) for l in f if l.strip()]
    fig, ax = plt.subplots(figsize=(8, 4))
    for key in ("loss", "loss_s", "loss_r", "loss_c", "loss_p", "loss_attn", "loss_ssim", "loss_contra", "loss_style"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key, lw=1)
    ax.axvline(phase1_steps, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("step"), ax.set_yscale("log"), ax.legend(), ax.set_title("MagiCapture training loss")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)

# speed in the log: each phase's FLOPs per step, counted (model.count_flops) on its first micro-step's draw, and
# on a GPU of known peak the model FLOPs utilisation, FLOPs per second over that peak. The peaks: dense bf16
# tensor-core TFLOPS with fp32 accumulation, as PyTorch runs them (NVIDIA's datasheets and architecture
# whitepapers, without sparsity), by the first pattern found in the name torch reports ("NVIDIA H100 PCIe",
# "NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 4090"); a card not listed (an RTX 4090 D, say) gets no mfu
PEAK_TFLOPS = {r"H100 PCIe": 756, r"H100 NVL": 835, r"H100\b": 989, r"H200 NVL": 835, r"H200\b": 989,
               r"A100\b": 312, r"L40S\b": 362, r"L40\b": 181, r"L4\b": 121, r"RTX 4090$": 165, r"RTX 3090$": 71}

def peak_tflops_of(name):
    return next((v for pattern, v in PEAK_TFLOPS.items() if re.search(pattern, name)), None)

peak_tflops = None  # mfu is reported for bf16 and fp16 only: fp32 runs at another peak
if device.startswith("cuda") and dtype != "fp32":
    peak_tflops = peak_tflops_of(torch.cuda.get_device_name(device))

def micro_step_flops(phase, boost, drawn, trainable):
    """The FLOPs of a micro-step, forward and backward, counted on a pass of their own (under the counter, torch
    may round differently, and the run must not depend on where it counted) whose gradients are then dropped;
    eagerly, since a compiled function first called under the counter would never compile."""
    with eager(), count_flops() as counter:
        micro_step(phase, boost, drawn)
    for p in trainable:
        p.grad = None
    return counter.get_total_flops()

def accumulate(phase, boost, trainable):
    """A step's micro-steps (this process's share), each drawn, run and backpropagated; their gradients summed in
    the parameters' .grad -> (the step's mean terms for the log, on the device; eq. 7's missed faces or None)."""
    logged, missed = {}, None
    for micro in range(accum[phase]):
        drawn = draw_micro_batch(phase, boost)  # every process draws every micro-step: they stay in step
        if micro % world != rank:
            continue  # another process's share
        if phase not in micro_flop:
            micro_flop[phase] = micro_step_flops(phase, boost, drawn, trainable)
        # each micro-step's gradient is summed on its own, then added to the step's: the float sums are then
        # the same as where other processes run some of the micro-steps (whose sums all_reduce adds)
        held = [p.grad for p in trainable]
        opt.zero_grad(set_to_none=True)
        total, terms, skipped = micro_step(phase, boost, drawn,
                                           lambda loss: scaler.scale(loss / accum[phase]).backward())
        for p, g in zip(trainable, held):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        for name, v in dict(terms, **{"": total}).items():  # "": the total, the log's "loss"
            key = f"loss_{name}" if name else "loss"
            logged[key] = logged.get(key, 0.0) + v.detach().float() / accum[phase]
        if skipped is not None:  # (a tensor: `missed or 0` would read it back)
            missed = skipped if missed is None else missed + skipped
    return logged, missed

def fewer_draws_per_pass(phase, step):
    """After a step ran out of GPU memory: the phase's passes take the next smaller divisor of the step's draws, in
    as many more passes, for the rest of the run (the same draws, the same expected update). The step's gradients
    are dropped; it is then redone from its first draw."""
    n = micro_batch[phase]
    micro_batch[phase] = max(d for d in range(1, n) if draws % d == 0)
    accum[phase] = draws // micro_batch[phase]
    micro_flop.pop(phase, None)  # counted at the old pass size
    opt.zero_grad(set_to_none=True)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)  # the log's peak_gib: of the passes that fit
    layout = f"--batch_size={micro_batch[2]} --grad_accum={accum[2]} --phase1_batch_size={micro_batch[1]}"
    print(f"\nphase {phase} ran out of GPU memory at {n} draws per pass: from step {step + 1} on, its steps run "
          f"{accum[phase]} passes of {micro_batch[phase]} (the same {draws} draws per step; {layout} "
          "starts there)", file=sys.stderr, flush=True)

# Ctrl-C, or SIGTERM (a scheduler's stop: SLURM's scancel, `timeout`, `kill`, torchrun passing its own on): finish
# the step under way, write a checkpoint, say how to resume; a second one quits at once
stop_requested = False

def request_stop(signum, frame):
    global stop_requested
    stop_requested = signum  # the signal's number: the exit code says which (130: Ctrl-C, 143: SIGTERM)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print(f"\n{'Ctrl-C' if signum == signal.SIGINT else signal.Signals(signum).name}: stopping after this step to "
          "write a checkpoint (Ctrl-C or SIGTERM again quits at once, losing the work since the last checkpoint)",
          file=sys.stderr, flush=True)

def redo_validation(step):
    """A resumed run's checkpoint step was due a validation that its log row lacks (it failed, or a stop under
    torchrun left it out): draw it now, into that row."""
    with open(log_path) as f:
        rows = [json.loads(line) for line in f]
    if not rows or rows[-1]["step"] != step or "samples" in rows[-1]:
        return
    print(f"drawing the validation of step {step}, which the interrupted run did not")
    with eager():
        rows[-1].update(evaluate(step))
    data.write_whole(log_path, "".join(json.dumps(row) + "\n" for row in rows))

# -----------------------------------------------------------------------------
# the loop
start = 0
ran_before = 0.0  # a resumed run's seconds before its checkpoint: the log's `seconds` go on from there
if ckpt is not None:
    start = ckpt["step"]
    with torch.no_grad():
        embeds.copy_(ckpt["embeds"])
    gen.set_state(ckpt["gen"])
    if master and os.path.exists(log_path):  # drop log lines written after the checkpoint by the interrupted run
        def before_checkpoint(line):  # the last line may be cut short, by a full disk or a kill
            try:
                return json.loads(line)["step"] <= start
            except ValueError:
                return False
        with open(log_path) as f:
            kept = [l for l in f if before_checkpoint(l)]
        data.write_whole(log_path, "".join(kept))
        ran_before = json.loads(kept[-1]).get("seconds", 0.0) if kept else 0.0
if master and ckpt is None:  # everything checked and loaded: an earlier run's files go before this one writes its own
    clear_out_dir([name for name in RUN_FILES + RUN_DIRS if name != "masks"])
    for name in set(os.listdir(os.path.join(out_dir, "masks"))) - overlays:  # other photos' overlays
        os.remove(os.path.join(out_dir, "masks", name))
if master:
    data.write_whole(os.path.join(out_dir, "config.json"),
                     json.dumps(dict(config, run_id=run_id, photos=photo_digests), indent=2))

trained2 = " + ".join(name for name, on in (("LoRA", lora_targets or lora_text_encoder),
                                             ("weights in full", full_targets), ("embeddings", True)) if on)
print(f"phase 1: {phase1_steps} steps (embeddings) of {accum[1]} x {micro_batch[1]} draws, phase 2: {phase2_steps} "
      f"steps ({trained2}) of {accum[2]} x {micro_batch[2]} draws (micro-steps x draws of a source and a "
      f"reference photo in one pass); compute {dtype} on {device}")

from tqdm import tqdm
bar = tqdm(total=total_steps, initial=start, unit="step", disable=not master)
signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)
t0 = time.time()
t_row, step_row, paused = t0, start, 0.0  # the last log row's time and step; validation and checkpoint seconds since
micro_flop = {}  # phase -> FLOPs of one micro-step, forward and backward
peak_gib = 0.0  # the largest GPU memory of the log's rows
for phase, first, steps in ((1, 0, phase1_steps), (2, phase1_steps, phase2_steps)):
    if max(start, first) >= first + steps and not (ckpt is not None and ckpt["phase"] == phase):
        continue  # a phase of 0 steps, or one finished before the resumed checkpoint (else: its weights are loaded)
    opt, sched = setup_phase(phase)
    if ckpt is not None and ckpt["phase"] == phase:  # resuming inside this phase
        with torch.no_grad():
            for k, v in trained_tensors().items():
                v.copy_(ckpt["trained"][k])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if master and (start % eval_interval == 0 or start == first + steps):
            redo_validation(start)
    trainable = [p for g in opt.param_groups for p in g["params"]]
    for step in range(max(start, first), first + steps):
        boost = style_boost if step - first < steps / 2 else 1.0
        # draw the step's micro-batches, backpropagate each, then one optimiser step; the terms stay on the device
        gen_before = gen.get_state()  # where this step's draws start: to redo them, or for a checkpoint
        while True:
            try:
                logged, missed = accumulate(phase, boost, trainable)
                if world > 1:  # each process holds its share of the sum over micro-steps: add them up (a process
                    for p in trainable:  # whose step failed shows here as an error in the others)
                        dist.all_reduce(p.grad)
                break
            except Exception as e:
                # out of GPU memory in passes of several draws (one process): the step is redone in smaller passes;
                # any other failure: the steps done so far are kept (by any process: each holds the whole state),
                # then the error is shown
                if not (isinstance(e, torch.OutOfMemoryError) and world == 1 and micro_batch[phase] > 1):
                    if step > 0:  # (a phase's first step: the checkpoint of the phase before is there)
                        keep_done(step, phase, f"step {step + 1}", gen_before)
                    say_memory_hint(e, phase)
                    raise
            # (out of the except block: the error no longer holds the failed passes' tensors, which can be freed)
            fewer_draws_per_pass(phase, step)
            gen.set_state(gen_before)
        scaler.unscale_(opt)
        if phase == 2 or grad_clip_phase1:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        scaler.step(opt)
        scaler.update()
        if phase == 1 and clip_ti_decay:
            pull_norms_toward(0.4, min(1.0, 100 * opt.param_groups[0]["lr"]))
        sched.step()
        opt.zero_grad(set_to_none=True)

        # log, evaluate, checkpoint: the host reads the terms only on these steps (no sync in between)
        done = step + 1
        stop = stop_requested  # read once: a Ctrl-C from here on stops after the next step (which it checkpoints)
        if world > 1:  # Ctrl-C reaches the processes at different moments: stop when any of them was asked to
            flag = torch.tensor([float(stop)])
            dist.all_reduce(flag, group=host_group)
            stop = flag.item() > 0
        last = done == first + steps
        # under torchrun a stop leaves validation out: torchrun kills the processes 30 s after Ctrl-C (its
        # --shutdown_timeout), and the checkpoint must be written by then
        evaluate_now = (done % eval_interval == 0 or last) and not (stop and world > 1)
        log_now = done % log_interval == 0 or evaluate_now
        checkpoint_now = done % ckpt_interval == 0 or last or stop
        if log_now or checkpoint_now:
            if missed is not None:  # samples of this step where the detector found no face: summed with the terms
                logged["id_skipped"] = missed.float()
            if world > 1:  # every process logs the same terms (the whole batch's), so all stop together on a NaN
                keys = sorted(logged)
                summed = torch.stack([torch.as_tensor(logged[k], device=device) for k in keys])
                dist.all_reduce(summed)
                logged = dict(zip(keys, summed))
            values = {k: v.item() for k, v in logged.items()}
            bad = [k for k, v in values.items() if not np.isfinite(v)]
            if bad:  # checked before every checkpoint, so none holds the diverged weights
                raise SystemExit(f"by step {done}: loss term '{bad[0]}' is {values[bad[0]]}. Nothing was saved since; "
                                 f"the last checkpoint is in {ckpt_dir}. Try a lower learning rate, dtype=bf16 "
                                 "instead of fp16, or check the photos and masks.")
        if log_now and master:
            lrs = {g["name"]: g["lr"] for g in opt.param_groups}  # lr: the embeddings'; lr_lora, lr_full: the others'
            skipped = values.pop("id_skipped", None)  # eq. 7's samples of this step where no face was found
            row = dict(step=done, phase=phase, loss=values.pop("loss"), **values, lr=lrs.pop("embeds"),
                       **{f"lr_{name}": v for name, v in lrs.items()})
            if skipped is not None:
                row["id_skipped"] = int(skipped)
            row["seconds"] = round(time.time() - t0 + ran_before, 2)
            # the steps since the last row, evaluation and checkpoints left out (the loss values read above
            # waited for the device, so these steps are done)
            step_seconds = (time.time() - t_row - paused) / (done - step_row)
            t_row, step_row, paused = time.time(), done, 0.0
            step_flop = micro_flop[phase] * accum[phase]  # all processes' micro-steps
            row.update(step_seconds=round(step_seconds, 4), gflop=round(step_flop / 1e9, 3),
                       draws_per_pass=micro_batch[phase])  # fewer after running out of GPU memory
            if peak_tflops:
                row["mfu"] = round(step_flop / step_seconds / (peak_tflops * 1e12), 4)
            if device.startswith("cuda"):  # the most GPU memory the steps since the last row held
                row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                peak_gib = max(peak_gib, row["peak_gib"])
                torch.cuda.reset_peak_memory_stats(device)
            if evaluate_now:
                bar.set_description_str("drawing validation samples")
                try:
                    with eager():  # compiling the sampler's batch without gradients would cost more than it saves
                        row.update(evaluate(done))
                except Exception as e:
                    append_log(row)
                    keep_done(done, phase, f"validation at step {done}")
                    say_memory_hint(e, phase, validation=True)
                    raise
                bar.set_description_str("")
                if device.startswith("cuda"):  # the next row's peak: its training steps', not this validation's
                    torch.cuda.reset_peak_memory_stats(device)
                seconds = time.time() - t_row  # the validation's
                row["eval_seconds"] = round(seconds, 2)
                paused += seconds
            append_log(row)
            mfu = {"mfu": f"{row['mfu']:.0%}"} if peak_tflops else {}
            bar.set_postfix(phase=phase, loss=f"{row['loss']:.4f}", **mfu)
        bar.update()
        if checkpoint_now and master:
            t = time.time()
            save_checkpoint(done, phase)
            paused += time.time() - t
        if stop and done < total_steps:
            bar.close()
            if world > 1:
                dist.destroy_process_group()
            if master:
                again = [a for a in sys.argv if not a.startswith(("--resume", "--overwrite"))] + ["--resume"]
                launch = ["torchrun", "--standalone", f"--nproc_per_node={world}"] if world > 1 else ["python"]
                print(f"stopped at step {done} of {total_steps}; checkpoint {checkpoints()[-1]}.\n"
                      f"Continue with: {shlex.join(launch + again)}", file=sys.stderr)
            sys.exit(128 + (stop_requested or signal.SIGINT))  # the shell's code for a run ended by that signal
bar.close()
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)

if world > 1:
    dist.destroy_process_group()
if not master:
    sys.exit(0)  # the first process writes the outputs
meta = {k: json.dumps(config[k]) for k in ("init_from", "lora_rank", "lora_alpha", "seed", "phase1_steps",
                                           "phase2_steps", "resolution")}
lora.save_result(out_dir, sd.unet, sd.text_encoder if lora_text_encoder else None,
                 {tok: per_encoder(row) for tok, row in zip(tokens, embeds)}, meta,
                 weights=None if save_pipeline else {k: p.data for k, p in full_params.items()},
                 text_encoder_2=sd.text_encoder_2 if lora_text_encoder and sd.is_xl else None)
if save_pipeline:  # the whole fine-tuned model, for diffusers' from_pretrained and init_from (its tokens: EMBEDS_FILE)
    sd.save_pretrained(os.path.join(out_dir, "pipeline"))
plot_losses(log_path, os.path.join(out_dir, "loss.png"))
if device.startswith("cuda"):
    print(f"peak GPU memory: {max(peak_gib, torch.cuda.max_memory_allocated(device) / 2**30):.2f} GiB")
print(f"done: {out_dir} holds {', '.join(sorted(os.listdir(out_dir)))}")
