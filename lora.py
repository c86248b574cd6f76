"""
Hand-rolled LoRA (Hu et al. 2021), as MagiCapture uses it: W' = W + U V^T.

inject() turns chosen nn.Linear layers into LoRALinear in place. The base
weight and bias keep their parameter paths (`to_q.weight`, `to_q.bias`), so a
checkpoint still loads strictly; the update adds `to_q.lora_A.weight`
(rank x in) and `to_q.lora_B.weight` (out x rank), the names PEFT and
diffusers use.

A training run's outputs (save_result / load_result) are files in one folder: the learned
token embeddings, the LoRA in the diffusers/PEFT format, and the same LoRA in the kohya format read
by AUTOMATIC1111 and ComfyUI; beside them EMBEDS_DIR, one embedding file per token, for the embeddings
folders of AUTOMATIC1111 and ComfyUI. A run that trained no LoRA (phase 2 of 0 steps, or lora_targets=()
as the DreamBooth and Custom Diffusion baselines) has no LoRA files; one that trained weights in full has
WEIGHTS_FILE, those weights (with save_pipeline, a whole pipeline/ folder instead). An SDXL run (two text encoders) writes SDXL's variants of the same formats.
"""

import json
import math
import os
import re
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from model import read_safetensors

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
# SD1.x {token: vector}, diffusers' load_textual_inversion format; SDXL {"clip_l": (n_tokens, 768), "clip_g":
# (n_tokens, 1280)}, rows in the order of the header's "tokens" (a JSON list), as diffusers' SDXL pivotal-tuning
# script writes them
EMBEDS_FILE = "learned_embeds.safetensors"
# <name>.safetensors per token: SD1.x {token: (1, 768)}, which diffusers' load_textual_inversion(path) reads
# with its token, and AUTOMATIC1111 and ComfyUI as a file of one tensor; SDXL {"clip_l": (1, 768), "clip_g": (1, 1280)}
EMBEDS_DIR = "embeddings"
KOHYA_FILE = "lora_kohya.safetensors"  # the kohya format, for AUTOMATIC1111 and ComfyUI
WEIGHTS_FILE = "trained_weights.safetensors"  # weights trained in full (Custom Diffusion's attn2 k/v): {unet.<name>: ...}

# Targets, as regexes matched with re.fullmatch against the full module name.
# The paper: "the projection layers of the cross-attention modules".
PAPER_UNET = (r".*attn2\.(to_q|to_k|to_v|to_out\.0)",)
# The official script: every Linear under diffusers' attention classes (self
# and cross) and GEGLU (ff.net.0.proj), plus the CLIP text encoder attention.
OFFICIAL_UNET = (r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)", r".*ff\.net\.0\.proj")
OFFICIAL_TEXT_ENCODER = (r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)",)


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update: y = x W^T + b + scale * (alpha/rank) * x A^T B^T."""

    def __init__(self, base, rank, alpha, generator=None):
        # skip nn.Linear.__init__: reuse the base's Parameter objects instead of allocating new ones
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        # lora_A is V^T in the paper, kohya's lora_down; lora_B is U, kohya's lora_up. skip_init: no
        # default init, which would draw from the global RNG; both are set just below
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.utils.skip_init(nn.Linear, base.in_features, rank, **kw)
        self.lora_B = nn.utils.skip_init(nn.Linear, rank, base.out_features, **kw)
        # official code (cloneofsimo/lora): down ~ N(0, std 1/r), up = 0, so training starts at W.
        # Drawn on the CPU in float32, then copied: a CPU generator gives the same init on any device.
        with torch.no_grad():
            self.lora_A.weight.copy_(torch.empty(self.lora_A.weight.shape).normal_(0, 1 / rank, generator=generator))
        nn.init.zeros_(self.lora_B.weight)
        self.rank, self.alpha = rank, alpha
        self.scale = 1.0  # inference knob (official inference: 0.6 UNet, 0.9 text encoder)
        self.merged = False

    def delta(self):
        """The weight update scale * (alpha/rank) * B A, (out, in), in float32."""
        return (self.scale * self.alpha / self.rank) * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        # the LoRA weights may be float32 over a half-precision base: compute in their dtype
        up = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)))
        return out + (self.scale * self.alpha / self.rank) * up.to(out.dtype)

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, scale={self.scale}"


def lora_modules(model):
    """(name, LoRALinear) pairs of a model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(model):
    """The trainable LoRA parameters of a model (A and B of every LoRALinear)."""
    return [p for _, m in lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]


def inject(model, patterns, rank=4, alpha=None, generator=None):
    """Add LoRA to every nn.Linear whose full name re.fullmatch-es one of the patterns; return the names.

    alpha=None means alpha = rank (scaling 1), as in the official code. lora_A's random init is drawn
    from `generator` (a CPU torch.Generator), or from the global RNG when it is None.
    """
    alpha = rank if alpha is None else alpha
    names = targets(model, patterns)
    lora_names = {n for n, _ in lora_modules(model)}
    for name in names:
        if name in lora_names:
            raise ValueError(f"{name} already has LoRA")
    if not names:
        raise ValueError(f"no nn.Linear in {type(model).__name__} matches any of {list(patterns)}")
    for name in names:  # replace after the walk: named_modules must not see a changing tree
        model.set_submodule(name, LoRALinear(model.get_submodule(name), rank, alpha, generator))
    return names


def targets(model, patterns):
    """The names of the nn.Linear layers whose full name re.fullmatch-es one of the patterns; the lora_A and
    lora_B inside a LoRALinear are not targets."""
    lora_names = {n for n, _ in lora_modules(model)}
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and any(re.fullmatch(p, name) for p in patterns) and name.rpartition(".")[0] not in lora_names]


def set_scale(model, scale):
    """Set the runtime LoRA scale of every LoRALinear in the model (0 = base model)."""
    for name, m in lora_modules(model):
        if m.merged:
            raise RuntimeError(f"{name} is merged into its base weight: set the scale before merge()")
        m.scale = scale


@torch.no_grad()
def merge(*models):
    """Fold each LoRA update of the models (None is skipped: SD1.5 has no text_encoder_2), at its current scale,
    into its base weight, so inference costs nothing extra. One way: the scale is fixed from then on (sample.py
    merges once the result is loaded)."""
    for model in models:
        for _, m in lora_modules(model) if model is not None else ():
            if not m.merged:
                m.weight.copy_(m.weight.float() + m.delta())  # summed in float32: one rounding to the base dtype
                m.merged = True


def lora_state_dict(model, prefix):
    """PEFT/diffusers keys `<prefix>.<module path>.lora_{A,B}.weight`, with alpha/rank folded into B.

    diffusers assumes alpha = rank when a file gives none, so folding the
    factor in makes its delta equal ours. The runtime scale is not saved.
    """
    sd = {}
    for name, m in lora_modules(model):
        sd[f"{prefix}.{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        sd[f"{prefix}.{name}.lora_B.weight"] = (m.lora_B.weight.detach() * (m.alpha / m.rank)).contiguous()
    return sd


def is_sdxl(unet):
    """Whether a UNet is SDXL's: only SDXL's has add_embedding (pooled text + size conditioning); SD1.x's has not."""
    return getattr(unet, "add_embedding", None) is not None


def save_lora_file(unet, text_encoder, path, metadata=None, text_encoder_2=None):
    """Write the diffusers/PEFT file (keys unet.*, text_encoder.*, and SDXL's text_encoder_2.*, the prefixes
    StableDiffusionXLPipeline.load_lora_weights reads); either text encoder may be None; metadata: {str: str}
    in the header."""
    sd = lora_state_dict(unet, "unet")
    for prefix, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is not None:
            sd |= lora_state_dict(model, prefix)
    if not sd:
        raise ValueError("no LoRA to save: inject() was never called on these models")
    save_file({k: v.cpu() for k, v in sd.items()}, path, metadata=metadata)


def alpha_over_rank(config, prefix, name, rank):
    """The update's factor alpha / rank for one module of a file whose header records its peft LoraConfig per
    prefix (diffusers' lora_adapter_metadata: "unet.lora_alpha", "unet.alpha_pattern", ...). Files without it
    (ours: alpha / rank is folded into B) get 1, which is what diffusers assumes too."""
    if f"{prefix}.lora_alpha" not in config:
        return 1.0
    if config.get(f"{prefix}.use_dora"):
        raise ValueError(f"{prefix}: a DoRA adapter (use_dora), which this LoRA cannot apply")
    alpha = config[f"{prefix}.lora_alpha"]
    for pattern, a in (config.get(f"{prefix}.alpha_pattern") or {}).items():  # peft: a pattern matches a name's end
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", name):
            alpha = a
    return alpha / (math.sqrt(rank) if config.get(f"{prefix}.use_rslora") else rank)


def load_lora_file(unet, text_encoder, path, scale=1.0, text_encoder_2=None):
    """Read a file written by save_lora_file (or by diffusers' save_lora_weights, whose header may record
    lora_alpha) into the models, injecting LoRA where it is missing."""
    sd, header = read_safetensors(path)
    config = json.loads(header.get("lora_adapter_metadata", "{}"))
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    suffix_a, suffix_b = ".lora_A.weight", ".lora_B.weight"
    a_keys = [k for k in sd if k.endswith(suffix_a)]
    stray = set(sd) - set(a_keys) - {k[: -len(suffix_a)] + suffix_b for k in a_keys}
    if stray:
        # other trainers' namings: kohya's (lora_unet_..., also what export_kohya writes), diffusers' older
        # attention-processor files (...processor.to_q_lora.down.weight), and peft's own state dict
        naming = ("kohya's naming (lora_unet_..., lora_down/lora_up)" if any(".lora_down." in k for k in stray) else
                  "diffusers' old attention-processor naming (to_q_lora.down)" if any("_lora.down." in k for k in stray)
                  else "peft's naming (base_model.model...)" if any(k.startswith("base_model.") for k in stray)
                  else f"unexpected keys {sorted(stray)[:5]}")
        raise ValueError(f"{path}: {naming}; this reads LoRA files in diffusers' naming (unet.<module>.lora_A.weight, "
                         f"text_encoder...), as train.py's {LORA_FILE} and diffusers' save_lora_weights write them")
    for key in a_keys:
        prefix, _, name = key[: -len(suffix_a)].partition(".")
        if models.get(prefix) is None:
            raise ValueError(f"{path}: {key} is for {prefix!r}, which was not given")
        model, a = models[prefix], sd[key]
        if hasattr(model, "text_model") and not name.startswith("text_model."):
            name = "text_model." + name  # transformers 5's CLIPTextModel names its modules without text_model
        b = sd.get(key[: -len(suffix_a)] + suffix_b)
        if b is None:
            raise ValueError(f"{path}: {key} has no matching lora_B")
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: {key} names {name}, which the {prefix} has not: a LoRA for another model, "
                             "or in another naming") from None
        if not isinstance(m, LoRALinear):
            # its own generator: the random init is overwritten below, and the global RNG stays untouched
            inject(model, [re.escape(name)], rank=a.shape[0], generator=torch.Generator())
            m = model.get_submodule(name)
        if m.lora_A.weight.shape != a.shape or m.lora_B.weight.shape != b.shape:
            raise ValueError(
                f"{path}: {name} has A {tuple(a.shape)}, B {tuple(b.shape)}; the model has "
                f"A {tuple(m.lora_A.weight.shape)}, B {tuple(m.lora_B.weight.shape)}"
            )
        with torch.no_grad():
            m.lora_A.weight.copy_(a)
            m.lora_B.weight.copy_(b)
        try:  # B in our files already carries alpha / rank; a peft LoraConfig in the header gives its own
            m.alpha = m.rank * alpha_over_rank(config, prefix, name, m.rank)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    for model in models.values():
        if model is not None:
            set_scale(model, scale)


def kohya_sdxl_unet_name(name):
    """The path of a Linear of diffusers' SDXL UNet in the SGM/LDM layout (Stability's checkpoint) that kohya's
    sd-scripts trains SDXL on and names its LoRA keys after (SD1.x it trains on diffusers' layout).

    SDXL has 3 levels. The down path is numbered input_blocks 1..8: level b's 2 layers are 3b+1 and 3b+2, its
    downsampler 3b+3 (input_blocks.0 is conv_in). The up path is output_blocks 0..8: level b's 3 layers are
    3b..3b+2. Within a layer the resnet is .0 and the attention .1; the mid block is middle_block.0 (resnet),
    .1 (attention), .2 (resnet). Inside an attention the names are the same in both layouts; a resnet's one
    Linear, time_emb_proj, is emb_layers.1. (sd-scripts' sdxl_model_util.make_unet_conversion_map.)
    """
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        path, level, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if level > 2 or j > (1 if path == "down" else 2):
            raise ValueError(f"{name}: SDXL's UNet has 3 levels of 2 layers down and 3 up; this UNet is not SDXL's")
        block = f"input_blocks.{3 * level + j + 1}" if path == "down" else f"output_blocks.{3 * level + j}"
        layer = f"{block}.{0 if kind == 'resnets' else 1}"
    elif m := re.fullmatch(r"mid_block\.(resnets\.0|attentions\.0|resnets\.1)\.(.+)", name):
        layer = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}[m[1]]
        kind, rest = m[1].split(".")[0], m[2]
    else:
        top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
        if name not in top:
            raise ValueError(f"{name}: no place in the SGM layout of SDXL's UNet known to kohya_sdxl_unet_name")
        return top[name]
    if kind == "resnets":
        if rest != "time_emb_proj":
            raise ValueError(f"{name}: the only Linear of an SDXL resnet is time_emb_proj")
        rest = "emb_layers.1"
    return f"{layer}.{rest}"


def export_kohya(unet, text_encoder, path, metadata=None, text_encoder_2=None):
    """Write the kohya format read by AUTOMATIC1111 and ComfyUI; either text encoder may be None.

    Keys: lora_unet_<path, dots to underscores>.lora_down.weight / .lora_up.weight
    and .alpha (the real alpha, a scalar: readers scale by alpha / rank);
    text encoder under lora_te_. Metadata keys get the ss_ prefix kohya uses.
    SDXL (is_sdxl(unet)): the UNet paths are the SGM ones of kohya_sdxl_unet_name, the text encoders go
    under lora_te1_ and lora_te2_, and the header says ss_base_model_version = sdxl_base_v1-0, kohya's tag,
    by whose "sdxl_" AUTOMATIC1111 tells an SDXL LoRA.
    """
    sdxl = is_sdxl(unet)
    if text_encoder_2 is not None and not sdxl:
        raise ValueError("export_kohya: text_encoder_2 was given, but the UNet is not SDXL's (it has no add_embedding)")
    sd = {}
    for prefix, model in (("lora_unet", unet), ("lora_te1" if sdxl else "lora_te", text_encoder),
                          ("lora_te2", text_encoder_2)):
        if model is None:
            continue
        for name, m in lora_modules(model):
            if sdxl and model is unet:
                name = kohya_sdxl_unet_name(name)
            key = f"{prefix}_{name.replace('.', '_')}"
            sd[f"{key}.lora_down.weight"] = m.lora_A.weight.detach().cpu().contiguous()
            sd[f"{key}.lora_up.weight"] = m.lora_B.weight.detach().cpu().contiguous()
            sd[f"{key}.alpha"] = torch.tensor(float(m.alpha))
    if not sd:
        raise ValueError("no LoRA to export: inject() was never called on these models")
    header = {"ss_network_module": "networks.lora"}  # how kohya's tools tag a plain LoRA
    if sdxl:
        header["ss_base_model_version"] = "sdxl_base_v1-0"
    header |= {k if k.startswith("ss_") else f"ss_{k}": v for k, v in (metadata or {}).items()}
    save_file(sd, path, metadata=header)


def embedding_file_name(token):
    """The file, in EMBEDS_DIR, of a token's embedding: AUTOMATIC1111 and ComfyUI call an embedding by its
    file name, and Windows allows none of <>:"/\\|?* in one, so "<v1>" is v1.safetensors (called as v1)."""
    name = re.sub(r'[<>:"/\\|?*\s]', "", token)
    if not name:
        raise ValueError(f"token {token!r} leaves no file name once <>:\"/\\|?* and spaces are removed; "
                         "choose a placeholder with letters or digits, e.g. <v1>")
    return f"{name}.safetensors"


def save_result(out_dir, unet, text_encoder, embeds, metadata, weights=None, text_encoder_2=None):
    """Write a training run's outputs into out_dir: EMBEDS_FILE, LORA_FILE and KOHYA_FILE when the
    models have LoRA, and WEIGHTS_FILE when `weights` ({"unet.<name>", "text_encoder.<name>" or
    "text_encoder_2.<name>": tensor}, the parameters trained in full) is given. text_encoder, text_encoder_2:
    None when it has no LoRA; metadata: {str: str}, written into every file's header. Mirrors load_result.

    embeds: SD1.x {token: 1-D tensor}. SDXL (is_sdxl(unet)): {token: (vector of text_encoder, vector of
    text_encoder_2)}. Besides EMBEDS_FILE, each token gets EMBEDS_DIR/embedding_file_name(token): SD1.x its
    row under its name, SDXL its clip_l and clip_g rows (the SDXL embedding format of AUTOMATIC1111 and
    ComfyUI). diffusers reads an SDXL file as e = load_file(...); pipe.load_textual_inversion(e["clip_l"],
    token=..., text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer), and e["clip_g"] with
    pipe.text_encoder_2 and pipe.tokenizer_2 (token: the list in EMBEDS_FILE's "tokens" header entry, or the
    one token of a file in EMBEDS_DIR).
    """
    sdxl = is_sdxl(unet)
    paired = [isinstance(v, (tuple, list)) and len(v) == 2 for v in embeds.values()]
    if sdxl and not all(paired):
        raise ValueError("save_result: an SDXL UNet takes embeds as {token: (vector of text_encoder, vector of "
                         "text_encoder_2)}")
    if not sdxl and any(paired):
        raise ValueError("save_result: embeds of two vectors per token are for SDXL, but the UNet is not SDXL's")
    tokens = list(embeds)
    files = [embedding_file_name(t) for t in tokens]
    if len(set(files)) < len(files):
        raise ValueError(f"tokens {tokens} give the same file names {files}: make them differ in letters or digits")
    os.makedirs(out_dir, exist_ok=True)
    # the per-token files: rewritten whole, so none of an earlier run's tokens remain
    shutil.rmtree(os.path.join(out_dir, EMBEDS_DIR), ignore_errors=True)
    os.makedirs(os.path.join(out_dir, EMBEDS_DIR))
    if sdxl:
        rows = {key: torch.stack([embeds[t][i].detach().cpu() for t in tokens])
                for i, key in enumerate(("clip_l", "clip_g"))}
        save_file(rows, os.path.join(out_dir, EMBEDS_FILE), metadata=dict(metadata, tokens=json.dumps(tokens)))
        per_token = [{key: r[i:i + 1].clone() for key, r in rows.items()} for i in range(len(tokens))]
    else:
        save_file({tok: v.detach().cpu().contiguous() for tok, v in embeds.items()},
                  os.path.join(out_dir, EMBEDS_FILE), metadata=metadata)
        per_token = [{tok: v.detach().cpu()[None].contiguous()} for tok, v in embeds.items()]
    for file, tensors in zip(files, per_token):
        save_file(tensors, os.path.join(out_dir, EMBEDS_DIR, file), metadata=metadata)
    if weights:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()},
                  os.path.join(out_dir, WEIGHTS_FILE), metadata=metadata)
    elif os.path.exists(os.path.join(out_dir, WEIGHTS_FILE)):  # an earlier run's: load_result would apply it
        os.remove(os.path.join(out_dir, WEIGHTS_FILE))
    models = [m for m in (unet, text_encoder, text_encoder_2) if m is not None]
    modules = [m for model in models for _, m in lora_modules(model)]
    if not modules:  # an embeddings-only run: no LoRA file from an earlier run in this folder may remain
        for name in (LORA_FILE, KOHYA_FILE):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        return
    save_lora_file(unet, text_encoder, os.path.join(out_dir, LORA_FILE), metadata=metadata,
                   text_encoder_2=text_encoder_2)
    # kohya's header carries one rank and alpha for the network: the first module's (the per-module
    # alpha is in the file's tensors)
    kohya = dict(metadata, network_dim=str(modules[0].rank), network_alpha=str(modules[0].alpha))
    export_kohya(unet, text_encoder, os.path.join(out_dir, KOHYA_FILE), metadata=kohya, text_encoder_2=text_encoder_2)


def add_tokens(tokenizer, text_encoder, tokens):
    """Add placeholder tokens to a tokenizer, growing its text encoder's token embedding to hold them; returns
    their ids."""
    ids = tokenizer.add_tokens(tokens)
    if max(ids) >= text_encoder.text_model.embeddings.token_embedding.num_embeddings:
        text_encoder.resize_token_embeddings(max(ids) + 1)
    return ids


def load_result(sd, path, scale=1.0, text_scale=None):
    """Apply a training run's outputs to a StableDiffusion: its learned token embeddings, its LoRA if it has
    one, and the weights it trained in full if it has those; returns the added tokens. Mirrors save_result.
    (A run that fine-tuned everything, DreamBooth, also wrote its whole pipeline: pass that folder as the base
    model, and the run's folder here for its tokens.) An SDXL model (sd.text_encoder_2 and sd.tokenizer_2 not
    None) takes an SDXL run's outputs, into both text encoders.

    path: the run's folder, or its LORA_FILE or EMBEDS_FILE (the other is found beside it). scale: the
    LoRA's strength; text_scale, if given, the text encoders' LoRA's own (official inference: 0.6 UNet,
    0.9 text encoder).
    """
    if os.path.isdir(path):
        folder = path
    elif os.path.basename(path) in (LORA_FILE, EMBEDS_FILE) and os.path.isfile(path):
        folder = os.path.dirname(path)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such folder or file; expected a training run's folder (train.py's "
                                f"out_dir) or its {EMBEDS_FILE} or {LORA_FILE}")
    else:
        raise ValueError(f"{path} is not a training result; expected a training run's folder (train.py's "
                         f"out_dir) or its {EMBEDS_FILE} or {LORA_FILE}")
    embeds_path, lora_path = os.path.join(folder, EMBEDS_FILE), os.path.join(folder, LORA_FILE)
    if not os.path.isfile(embeds_path):
        unfinished = os.path.isdir(os.path.join(folder, "checkpoints"))  # train.py's, before its end
        raise FileNotFoundError(f"{folder or '.'} has no {EMBEDS_FILE}: " + (
            "an unfinished run (train.py writes it at the end): finish it with train.py's --resume" if unfinished
            else "not a training run's folder (train.py writes it into out_dir at the end of a run)"))
    text_encoder_2 = getattr(sd, "text_encoder_2", None)
    embeds, header = read_safetensors(embeds_path)
    sdxl_run = set(embeds) == {"clip_l", "clip_g"}
    if sdxl_run != (text_encoder_2 is not None):
        kinds = ("an SDXL", "an SD1.x") if sdxl_run else ("an SD1.x", "an SDXL")
        raise ValueError(f"{embeds_path} is {kinds[0]} run's, and the model is {kinds[1]} one: load the run into "
                         f"the model it was trained on (init_from in its config.json)")
    if sdxl_run and "tokens" not in header:
        raise ValueError(f"{embeds_path}: clip_l and clip_g rows without the header's \"tokens\" list that names "
                         "them: not written by lora.save_result")
    if not sdxl_run:  # one vector per token; diffusers' textual inversion writes each as (1, width)
        for t, v in embeds.items():
            if v.dim() != 1 and not (v.dim() == 2 and v.shape[0] == 1):
                raise ValueError(f"{embeds_path}: {t} is {tuple(v.shape)}; one vector per token is read")
        embeds = {t: v.reshape(-1) for t, v in embeds.items()}
    pairs = ([(embeds["clip_l"], sd.text_encoder), (embeds["clip_g"], text_encoder_2)] if sdxl_run
             else [(v, sd.text_encoder) for v in embeds.values()])
    for vectors, text_encoder in pairs:  # checked before anything is changed
        width = text_encoder.text_model.embeddings.token_embedding.weight.shape[1]
        if vectors.shape[-1] != width:
            raise ValueError(f"{embeds_path} holds token vectors {vectors.shape[-1]} wide, and the model's text "
                             f"encoder takes {width}: load the run into the model it was trained on (init_from in "
                             "its config.json)")
    run_config = os.path.join(folder, "config.json")  # train.py's: did the run train a LoRA?
    if not os.path.isfile(lora_path) and os.path.isfile(run_config):
        with open(run_config) as f:
            settings = json.load(f)
        if (settings.get("lora_targets") or settings.get("lora_text_encoder")) and settings.get("phase2_steps"):
            raise FileNotFoundError(f"{lora_path} is missing, and the run's config.json says it trained a LoRA: "
                                    "copy the run's whole folder")
    if os.path.isfile(lora_path):  # absent when the run trained no LoRA
        load_lora_file(sd.unet, sd.text_encoder, lora_path, scale, text_encoder_2=text_encoder_2)
        if text_scale is not None:
            for model in (sd.text_encoder, text_encoder_2):
                if model is not None:
                    set_scale(model, text_scale)
    if sdxl_run:
        tokens = json.loads(header["tokens"])
        encoders = [(sd.tokenizer, sd.text_encoder, embeds["clip_l"]),
                    (sd.tokenizer_2, text_encoder_2, embeds["clip_g"])]
    else:
        tokens = list(embeds)
        encoders = [(sd.tokenizer, sd.text_encoder, torch.stack([embeds[t] for t in tokens]))]
    ids = [add_tokens(tokenizer, text_encoder, tokens) for tokenizer, text_encoder, _ in encoders]
    weights_path = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(weights_path):  # parameters the run trained in full replace the base model's
        models = {"unet": sd.unet, "text_encoder": sd.text_encoder, "text_encoder_2": text_encoder_2}
        with torch.no_grad():
            for key, value in read_safetensors(weights_path)[0].items():
                prefix, _, name = key.partition(".")
                if models.get(prefix) is None:
                    raise ValueError(f"{weights_path}: {key} is for none of the model's unet and text encoders")
                p = models[prefix].get_parameter(name)
                if p.shape != value.shape:
                    raise ValueError(f"{weights_path}: {key} is {tuple(value.shape)}, the model's {tuple(p.shape)}")
                p.copy_(value)
    for (_, text_encoder, rows), token_ids in zip(encoders, ids):
        table = text_encoder.text_model.embeddings.token_embedding.weight  # read here: resizing may replace it
        with torch.no_grad():
            table[token_ids] = rows.to(table)
    return tokens
