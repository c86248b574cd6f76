"""
Hand-rolled LoRA (Hu et al. 2021), as MagiCapture uses it: W' = W + U V^T.

inject() turns chosen nn.Linear layers into LoRALinear in place. The base
weight and bias keep their parameter paths (`to_q.weight`, `to_q.bias`), so a
checkpoint still loads strictly; the update adds `to_q.lora_A.weight`
(rank x in) and `to_q.lora_B.weight` (out x rank), the names PEFT and
diffusers use.

A training run's outputs (save_result / load_result) are three files in one folder: the learned
token embeddings, the LoRA in the diffusers/PEFT format, and the same LoRA in the kohya format read
by AUTOMATIC1111 and ComfyUI. A run that trained no LoRA (phase 2 of 0 steps) has only the first.
"""

import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
EMBEDS_FILE = "learned_embeds.safetensors"  # {token: vector}, diffusers' load_textual_inversion format
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
    lora_names = {n for n, _ in lora_modules(model)}
    names = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or not any(re.fullmatch(p, name) for p in patterns):
            continue
        if name in lora_names:
            raise ValueError(f"{name} already has LoRA")
        if name.rpartition(".")[0] in lora_names:
            continue  # lora_A / lora_B of an existing LoRALinear are not targets
        names.append(name)
    if not names:
        raise ValueError(f"no nn.Linear in {type(model).__name__} matches any of {list(patterns)}")
    for name in names:  # replace after the walk: named_modules must not see a changing tree
        model.set_submodule(name, LoRALinear(model.get_submodule(name), rank, alpha, generator))
    return names


def set_scale(model, scale):
    """Set the runtime LoRA scale of every LoRALinear in the model (0 = base model)."""
    for name, m in lora_modules(model):
        if m.merged:
            raise RuntimeError(f"{name} is merged into its base weight: set the scale before merge()")
        m.scale = scale


@torch.no_grad()
def merge(model):
    """Fold each LoRA update, at its current scale, into its base weight, so inference costs nothing
    extra. One way: the scale is fixed from then on (sample.py merges once the result is loaded)."""
    for _, m in lora_modules(model):
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


def save_lora_file(unet, text_encoder, path, metadata=None):
    """Write the diffusers/PEFT file; text_encoder may be None; metadata: {str: str} in the header."""
    sd = lora_state_dict(unet, "unet")
    if text_encoder is not None:
        sd |= lora_state_dict(text_encoder, "text_encoder")
    if not sd:
        raise ValueError("no LoRA to save: inject() was never called on these models")
    save_file({k: v.cpu() for k, v in sd.items()}, path, metadata=metadata)


def load_lora_file(unet, text_encoder, path, scale=1.0):
    """Read a file written by save_lora_file into the models, injecting LoRA where it is missing."""
    sd = load_file(path)
    models = {"unet": unet, "text_encoder": text_encoder}
    suffix_a, suffix_b = ".lora_A.weight", ".lora_B.weight"
    a_keys = [k for k in sd if k.endswith(suffix_a)]
    stray = set(sd) - set(a_keys) - {k[: -len(suffix_a)] + suffix_b for k in a_keys}
    if stray:
        raise ValueError(f"{path}: unexpected keys {sorted(stray)[:5]}")
    for key in a_keys:
        prefix, _, name = key[: -len(suffix_a)].partition(".")
        if models.get(prefix) is None:
            raise ValueError(f"{path}: {key} is for {prefix!r}, which was not given")
        model, a = models[prefix], sd[key]
        b = sd.get(key[: -len(suffix_a)] + suffix_b)
        if b is None:
            raise ValueError(f"{path}: {key} has no matching lora_B")
        m = model.get_submodule(name)
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
        m.alpha = m.rank  # B in the file already carries alpha/rank
    for model in (unet, text_encoder):
        if model is not None:
            set_scale(model, scale)


def export_kohya(unet, text_encoder, path, metadata=None):
    """Write the kohya format read by AUTOMATIC1111 and ComfyUI; text_encoder may be None.

    Keys: lora_unet_<path, dots to underscores>.lora_down.weight / .lora_up.weight
    and .alpha (the real alpha, a scalar: readers scale by alpha / rank);
    text encoder under lora_te_. Metadata keys get the ss_ prefix kohya uses.
    """
    sd = {}
    for prefix, model in (("lora_unet", unet), ("lora_te", text_encoder)):
        if model is None:
            continue
        for name, m in lora_modules(model):
            key = f"{prefix}_{name.replace('.', '_')}"
            sd[f"{key}.lora_down.weight"] = m.lora_A.weight.detach().cpu().contiguous()
            sd[f"{key}.lora_up.weight"] = m.lora_B.weight.detach().cpu().contiguous()
            sd[f"{key}.alpha"] = torch.tensor(float(m.alpha))
    if not sd:
        raise ValueError("no LoRA to export: inject() was never called on these models")
    header = {"ss_network_module": "networks.lora"}  # how kohya's tools tag a plain LoRA
    header |= {k if k.startswith("ss_") else f"ss_{k}": v for k, v in (metadata or {}).items()}
    save_file(sd, path, metadata=header)


def save_result(out_dir, unet, text_encoder, embeds, metadata, weights=None):
    """Write a training run's outputs into out_dir: EMBEDS_FILE, LORA_FILE and KOHYA_FILE when the
    models have LoRA, and WEIGHTS_FILE when `weights` ({"unet.<name>" or "text_encoder.<name>": tensor},
    the parameters trained in full) is given. text_encoder: None when it has no LoRA; embeds: {token:
    1-D tensor}; metadata: {str: str}, written into every file's header. Mirrors load_result."""
    os.makedirs(out_dir, exist_ok=True)
    save_file({tok: v.detach().cpu().contiguous() for tok, v in embeds.items()},
              os.path.join(out_dir, EMBEDS_FILE), metadata=metadata)
    if weights:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()},
                  os.path.join(out_dir, WEIGHTS_FILE), metadata=metadata)
    models = [unet] + ([text_encoder] if text_encoder is not None else [])
    modules = [m for model in models for _, m in lora_modules(model)]
    if not modules:  # an embeddings-only run: no LoRA file from an earlier run in this folder may remain
        for name in (LORA_FILE, KOHYA_FILE):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        return
    save_lora_file(unet, text_encoder, os.path.join(out_dir, LORA_FILE), metadata=metadata)
    # kohya's header carries one rank and alpha for the network: the first module's (the per-module
    # alpha is in the file's tensors)
    kohya = dict(metadata, network_dim=str(modules[0].rank), network_alpha=str(modules[0].alpha))
    export_kohya(unet, text_encoder, os.path.join(out_dir, KOHYA_FILE), metadata=kohya)


def load_result(sd, path, scale=1.0, text_scale=None):
    """Apply a training run's outputs to a StableDiffusion: its learned token embeddings, its LoRA if it has
    one, and the weights it trained in full if it has those; returns the added tokens. Mirrors save_result.
    (A run that fine-tuned everything, DreamBooth, also wrote its whole pipeline: pass that folder as the base
    model, and the run's folder here for its tokens.)

    path: the run's folder, or its LORA_FILE or EMBEDS_FILE (the other is found beside it). scale: the
    LoRA's strength; text_scale, if given, the text encoder LoRA's own (official inference: 0.6 UNet,
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
        raise FileNotFoundError(f"{folder or '.'} has no {EMBEDS_FILE}: not a training run's folder "
                                f"(train.py writes it into out_dir at the end of a run)")
    if os.path.isfile(lora_path):  # absent when the run trained no LoRA
        load_lora_file(sd.unet, sd.text_encoder, lora_path, scale)
        if text_scale is not None:
            set_scale(sd.text_encoder, text_scale)
    embeds = load_file(embeds_path)
    tokens = list(embeds)
    ids = sd.tokenizer.add_tokens(tokens)
    if max(ids) >= sd.text_encoder.text_model.embeddings.token_embedding.num_embeddings:
        sd.text_encoder.resize_token_embeddings(max(ids) + 1)
    weights_path = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(weights_path):  # parameters the run trained in full replace the base model's
        models = {"unet": sd.unet, "text_encoder": sd.text_encoder}
        with torch.no_grad():
            for key, value in load_file(weights_path).items():
                prefix, _, name = key.partition(".")
                if prefix not in models:
                    raise ValueError(f"{weights_path}: {key} is for neither the unet nor the text_encoder")
                p = models[prefix].get_parameter(name)
                if p.shape != value.shape:
                    raise ValueError(f"{weights_path}: {key} is {tuple(value.shape)}, the model's {tuple(p.shape)}")
                p.copy_(value)
    table = sd.text_encoder.text_model.embeddings.token_embedding.weight  # re-read: resizing may replace it
    with torch.no_grad():
        for i, token in zip(ids, tokens):
            table[i] = embeds[token]
    return tokens
