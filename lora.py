"""
Hand-rolled LoRA (Hu et al. 2021), as MagiCapture uses it: W' = W + U V^T.

inject() turns chosen nn.Linear layers into LoRALinear in place. The base
weight and bias keep their parameter paths (`to_q.weight`, `to_q.bias`), so a
checkpoint still loads strictly; the update adds `to_q.lora_A.weight`
(rank x in) and `to_q.lora_B.weight` (out x rank), the names PEFT and
diffusers use. Files: the diffusers/PEFT format and the kohya format read by
AUTOMATIC1111 and ComfyUI (DESIGN.md section 5).
"""

import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
EMBEDS_FILE = "learned_embeds.safetensors"  # {token: vector}, diffusers' load_textual_inversion format

# Targets, as regexes matched with re.fullmatch against the full module name.
# The paper: "the projection layers of the cross-attention modules".
PAPER_UNET = (r".*attn2\.(to_q|to_k|to_v|to_out\.0)",)
# The official script: every Linear under diffusers' attention classes (self
# and cross) and GEGLU (ff.net.0.proj), plus the CLIP text encoder attention.
OFFICIAL_UNET = (r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)", r".*ff\.net\.0\.proj")
OFFICIAL_TEXT_ENCODER = (r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)",)


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update: y = x W^T + b + scale * (alpha/rank) * x A^T B^T."""

    def __init__(self, base, rank, alpha):
        # skip nn.Linear.__init__: reuse the base's Parameter objects instead of allocating new ones
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, **kw)  # V^T in the paper, kohya's lora_down
        self.lora_B = nn.Linear(rank, base.out_features, **kw)  # U in the paper, kohya's lora_up
        # official code (cloneofsimo/lora): down ~ N(0, std 1/r), up = 0, so training starts at W
        nn.init.normal_(self.lora_A.weight, std=1 / rank)
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


def inject(model, patterns, rank=4, alpha=None):
    """Add LoRA to every nn.Linear whose full name re.fullmatch-es one of the patterns; return the names.

    alpha=None means alpha = rank (scaling 1), as in the official code.
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
        model.set_submodule(name, LoRALinear(model.get_submodule(name), rank, alpha))
    return names


def set_scale(model, scale):
    """Set the runtime LoRA scale of every LoRALinear in the model (0 = base model)."""
    for name, m in lora_modules(model):
        if m.merged:
            raise RuntimeError(f"{name} is merged: unmerge before changing the scale")
        m.scale = scale


@torch.no_grad()
def merge(model):
    """Fold each LoRA update into its base weight, so inference costs nothing extra."""
    for _, m in lora_modules(model):
        if not m.merged:
            m.weight += m.delta().to(m.weight.dtype)
            m.merged = True


@torch.no_grad()
def unmerge(model):
    """Take the folded LoRA update back out of the base weights (inverse of merge)."""
    for _, m in lora_modules(model):
        if m.merged:
            m.weight -= m.delta().to(m.weight.dtype)
            m.merged = False


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
            inject(model, [re.escape(name)], rank=a.shape[0])
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


def load(sd, out_dir, scale=1.0, text_scale=None):
    """Apply a training run's outputs to a StableDiffusion: LoRA weights and learned token embeddings.

    Reads out_dir/LORA_FILE and out_dir/EMBEDS_FILE; returns the added tokens. text_scale, if given, is
    the text encoder LoRA's own scale (official inference: 0.6 UNet, 0.9 text encoder).
    """
    load_lora_file(sd.unet, sd.text_encoder, os.path.join(out_dir, LORA_FILE), scale)
    if text_scale is not None:
        set_scale(sd.text_encoder, text_scale)
    embeds = load_file(os.path.join(out_dir, EMBEDS_FILE))
    tokens = list(embeds)
    ids = sd.tokenizer.add_tokens(tokens)
    if max(ids) >= sd.text_encoder.text_model.embeddings.token_embedding.num_embeddings:
        sd.text_encoder.resize_token_embeddings(max(ids) + 1)
    table = sd.text_encoder.text_model.embeddings.token_embedding.weight  # re-read: resizing may replace it
    with torch.no_grad():
        for i, token in zip(ids, tokens):
            table[i] = embeds[token]
    return tokens
