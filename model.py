"""
Stable Diffusion 1.5 and SDXL in plain PyTorch: CLIP tokenizer and text encoder(s), VAE,
UNet, noise schedule and DDIM sampler, plus loading and saving of the
diffusers folder layout used on the Hugging Face Hub. One set of classes serves both:
each part's config.json says which SDXL features it has (model_index.json lists the
second tokenizer and text encoder).

Module attribute paths mirror the checkpoint keys (diffusers for the UNet and
VAE, transformers for the text encoder), so weights load with
load_state_dict(strict=True) and no renaming table. Where the checkpoint
dictates an odd name (`to_out.0`, `ff.net.2`, `conv_norm_out`) a comment says so.

    sd = StableDiffusion.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    images = sd.sample(["a photo of an astronaut"], seed=0)   # (1, 3, 512, 512) in [0, 1]
    sdxl = StableDiffusion.from_pretrained(SDXL_REPO, variant="fp16", dtype=torch.float16, device="cuda")
"""

import glob
import json
import math
import os
import shlex
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import (flop_registry, register_flop_formula, sdpa_backward_flop_count,
                                      sdpa_flop_count)

DEFAULT_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
CLIP_REPO = "openai/clip-vit-large-patch14"  # the image tower CLIPVisionModel loads by default
DINO_REPO = "facebook/dino-vitb8"  # the ViT the general-object losses (supplement eq. 11) read by default
# the one table from the --dtype setting's names (sample.py, train.py, bench.py) to torch dtypes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# -----------------------------------------------------------------------------
# configs: SD1.5 defaults, filled from each part's config.json

@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    attention_head_dim: int | tuple = 8  # the NUMBER of heads: a legacy misnomer in diffusers
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    sample_size: int = 64
    # SDXL's fields, absent from SD1.5's file (the defaults are what their absence means). SDXL base 1.0's
    # unet/config.json: [1, 2, 10], true, "text_time", 256, 2816; with attention_head_dim [5, 10, 20],
    # block_out_channels [320, 640, 1280], cross_attention_dim 2048 and a DownBlock2D/UpBlock2D top level
    transformer_layers_per_block: int | tuple = 1  # transformer blocks in each attentions.N, per level
    use_linear_projection: bool = False  # proj_in/proj_out: Linear (SD2, SDXL) or 1x1 Conv2d (SD1.x)
    addition_embed_type: str | None = None  # "text_time": pooled text and image sizes join the time embedding
    addition_time_embed_dim: int | None = None  # sinusoid width of each of the 6 size numbers (time_ids)
    projection_class_embeddings_input_dim: int | None = None  # add_embedding's input: pooled text + 6 sinusoids

@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # absent from the SD1.5 config.json; this is the default (SDXL's file: 0.13025)
    sample_size: int = 512
    # SDXL's VAE overflows in fp16, so its file says true and diffusers' SDXL pipeline decodes in fp32 when the
    # weights are fp16; SD1.5's file lacks the field (diffusers' default is true) and its pipeline never reads it
    force_upcast: bool = True

@dataclass
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    # "CLIPTextModelWithProjection" adds text_projection (SDXL's text_encoder_2: OpenCLIP ViT-bigG, 1280 wide,
    # 32 layers, hidden_act "gelu", projection_dim 1280)
    architectures: tuple = ("CLIPTextModel",)

@dataclass
class VisionConfig:  # defaults: openai/clip-vit-large-patch14's vision_config (ViT-L/14 at 224 px)
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 768
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

@dataclass
class ViTConfig:  # defaults: facebook/dino-vitb8's config.json (ViT-B/8 at 224 px)
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 8
    # transformers' ViT default, which the Hub's DINO configs keep; DINO's own code uses 1e-6. Either is far
    # below the variance of the tokens normalised, so the two differ by about eps / variance
    layer_norm_eps: float = 1e-12

@dataclass
class ScheduleConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    # as the file says it ("leading": SDXL's) or None where it does not (SD1.5's): DDIM spaces its steps "leading"
    # either way, as diffusers' DDIMScheduler does, while Euler ancestral takes "linspace" where none is given
    timestep_spacing: str | None = None

# config.json values this code does not implement: the value SD1.5 and SDXL have, and what
# a different value usually means, so the error can say what was loaded
UNSUPPORTED = {
    "unet": dict(
        upcast_attention=(False, "Stable Diffusion 2.1 (upcast attention)"),
        reverse_transformer_layers_per_block=(None, "a UNet with its own up-path transformer depths"),
        class_embed_type=(None, "a class-conditioned UNet"),
        time_cond_proj_dim=(None, "an LCM-distilled UNet"),
        encoder_hid_dim=(None, "a UNet with an encoder projection"),
        num_attention_heads=(None, "a UNet that sets num_attention_heads"),
        only_cross_attention=(False, "a UNet without self-attention"),
        dual_cross_attention=(False, "a UNet with dual cross-attention"),
        center_input_sample=(False, "a UNet that centres its input"),
        flip_sin_to_cos=(True, "a different timestep embedding"),
        freq_shift=(0, "a different timestep embedding"),
        time_embedding_type=("positional", "a different timestep embedding"),
        resnet_time_scale_shift=("default", "scale-shift time conditioning"),
        mid_block_type=("UNetMidBlock2DCrossAttn", "a different mid block"),
        act_fn=("silu", "a different activation"),
        downsample_padding=(1, "a different downsampler"),
        mid_block_scale_factor=(1, "a scaled mid block"),
        conv_in_kernel=(3, "a different conv_in"),
        conv_out_kernel=(3, "a different conv_out"),
        attention_type=("default", "gated attention"),
        dropout=(0.0, "a UNet trained with dropout"),
        encoder_hid_dim_type=(None, "a UNet with an encoder projection"),
        num_class_embeds=(None, "a class-conditioned UNet"),
        class_embeddings_concat=(False, "a class-conditioned UNet"),
        resnet_skip_time_act=(False, "a different resnet time conditioning"),
        resnet_out_scale_factor=(1.0, "scaled resnet outputs"),
        time_embedding_dim=(None, "a different timestep embedding"),
        time_embedding_act_fn=(None, "a different timestep embedding"),
        timestep_post_act=(None, "a different timestep embedding"),
        mid_block_only_cross_attention=(False, "a mid block without self-attention"),
        cross_attention_norm=(None, "normalised cross-attention context"),
    ),
    "vae": dict(
        act_fn=("silu", "a different activation"),
        shift_factor=(None, "an SD3/Flux-style VAE"),
        use_quant_conv=(True, "a VAE without quant_conv"),
        use_post_quant_conv=(True, "a VAE without post_quant_conv"),
        mid_block_add_attention=(True, "a VAE without mid-block attention"),
        latents_mean=(None, "a VAE with latent statistics"),
        latents_std=(None, "a VAE with latent statistics"),
    ),
    "text_encoder": dict(),
    "text_encoder_2": dict(),
    "image_encoder": dict(),
    "dino": dict(),
    "scheduler": dict(
        prediction_type=("epsilon", "a v-prediction model (e.g. SD 2.x 768)"),
        timestep_spacing=("leading", "another timestep spacing"),
        trained_betas=(None, "a schedule given as its list of betas"),
        rescale_betas_zero_snr=(False, "a zero-terminal-SNR schedule"),
    ),
}

def config_from_dict(cls, d, part):
    """Fill a config dataclass from a config.json dict; refuse what this code does not implement."""
    if part == "image_encoder":  # a CLIPVisionConfig json, or the full CLIP config.json holding a vision_config
        if d.get("model_type", "clip_vision_model") not in ("clip", "clip_vision_model"):
            raise ValueError(f"the CLIP config.json has model_type={d['model_type']!r}; model.py implements "
                             f"CLIP's image tower (model_type 'clip' or 'clip_vision_model'), e.g. {CLIP_REPO}.")
        if "vision_config" in d or "vision_config_dict" in d:
            # older files (openai's among them) repeat the tower's fields in vision_config_dict, which wins
            vision = {**d.get("vision_config", {}), **d.get("vision_config_dict", {})}
            if "projection_dim" in d:
                vision["projection_dim"] = d["projection_dim"]  # CLIPModel projects with the top-level value
            d = vision
        if d.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
            raise ValueError(f"the CLIP config.json has hidden_act={d['hidden_act']!r} for the image tower; "
                             "model.py implements quick_gelu and gelu.")
    for key, (want, meaning) in UNSUPPORTED[part].items():
        got = d.get(key, want)
        got = tuple(got) if isinstance(got, list) else got
        if want is False and got is None:  # SDXL's file has null for upcast_attention, which diffusers reads as false
            got = False
        if got != want:
            raise ValueError(f"{part}/config.json has {key}={got!r}, which looks like {meaning}. "
                             f"model.py implements the Stable Diffusion 1.x and SDXL architectures ({key}={want!r}).")
    if part == "unet":
        types = set(d.get("down_block_types", ())) | set(d.get("up_block_types", ()))
        unknown = types - {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
        if unknown:
            raise ValueError(f"unet/config.json has down_block_types/up_block_types {sorted(unknown)}; model.py implements "
                             "CrossAttnDownBlock2D, DownBlock2D, CrossAttnUpBlock2D and UpBlock2D.")
        depth, levels = d.get("transformer_layers_per_block", 1), len(d.get("down_block_types", UNetConfig.down_block_types))
        if not (isinstance(depth, int) or (isinstance(depth, list) and len(depth) == levels
                                           and all(isinstance(n, int) for n in depth))):
            raise ValueError(f"unet/config.json has transformer_layers_per_block={depth!r}; model.py implements one "
                             f"number, or one number per level ({levels} levels here, e.g. SDXL's [1, 2, 10]).")
        kind = d.get("addition_embed_type")
        if kind not in (None, "text_time"):
            raise ValueError(f"unet/config.json has addition_embed_type={kind!r}; model.py implements none (SD1.x) "
                             "and SDXL's 'text_time'.")
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if kind == "text_time" and d.get(key) is None:
                raise ValueError(f"unet/config.json has addition_embed_type='text_time' but no {key}: SDXL's "
                                 "file sets addition_time_embed_dim 256 and projection_class_embeddings_input_dim 2816.")
    if part == "vae":
        types = set(d.get("down_block_types", ())) | set(d.get("up_block_types", ()))
        if types - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
            raise ValueError(f"vae/config.json has down_block_types/up_block_types {sorted(types)}; model.py implements "
                             "DownEncoderBlock2D and UpDecoderBlock2D.")
    if part == "dino":  # what transformers' ViTModel can be set to and this ViT does not do
        for key, want in (("model_type", "vit"), ("hidden_act", "gelu"), ("qkv_bias", True)):
            if d.get(key, want) != want:
                raise ValueError(f"the DINO config.json has {key}={d[key]!r}; model.py implements DINO's ViT as "
                                 f"transformers' ViTModel stores it ({key}={want!r}), e.g. {DINO_REPO}.")
    if part in ("text_encoder", "text_encoder_2"):
        if d.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
            raise ValueError(f"{part}/config.json has hidden_act={d['hidden_act']!r}; "
                             "model.py implements quick_gelu and gelu.")
        arch = (d.get("architectures") or ["CLIPTextModel"])[0]
        if arch not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            raise ValueError(f"{part}/config.json has architectures [{arch!r}]; model.py implements "
                             "CLIPTextModel and CLIPTextModelWithProjection.")
    if part == "scheduler" and d.get("beta_schedule", "scaled_linear") not in ("scaled_linear", "linear"):
        raise ValueError(f"scheduler/scheduler_config.json has beta_schedule={d['beta_schedule']!r}; "
                         "model.py implements scaled_linear and linear.")
    kw = {}
    for f in fields(cls):
        if d.get(f.name) is not None:
            v = d[f.name]
            kw[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**kw)

# -----------------------------------------------------------------------------
# CLIP tokenizer (byte-level BPE, built with the `tokenizers` library)

def read_added_tokens(path, n):
    """The tokens a tokenizer folder added after its n-token vocabulary, in id order, as transformers writes them:
    added_tokens.json ({content: id}, transformers 4), tokenizer_config.json's added_tokens_decoder ({id: fields})
    or tokenizer.json's added_tokens ([fields with id])."""
    found = {}
    p = os.path.join(path, "added_tokens.json")
    if os.path.exists(p):
        found.update({int(i): dict(content=c) for c, i in read_json(p).items()})
    p = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(p):
        found.update({int(i): d for i, d in (read_json(p).get("added_tokens_decoder") or {}).items()})
    p = os.path.join(path, "tokenizer.json")
    if os.path.exists(p):
        found.update({d["id"]: d for d in read_json(p).get("added_tokens") or ()})
    ids = sorted(i for i in found if i >= n)  # those below n are the vocabulary's own (BOS, EOS)
    if ids != list(range(n, n + len(ids))):
        raise ValueError(f"{path}: the added tokens have ids {ids}, but tokens added to a {n}-token vocabulary "
                         f"take {n}, {n + 1}, ... in turn; the folder's tokenizer files disagree with each other")
    return [found[i] for i in ids]

class CLIPTokenizer:
    """Prompts -> (B, 77) ids: lower case, NFC, whitespace collapsed, BOS ... EOS, padded and truncated to 77."""

    def __init__(self, vocab, merges, pad_token="<|endoftext|>", max_length=77, extra=()):
        """extra: tokens the folder's tokenizer added after its vocabulary (ids len(vocab), len(vocab) + 1, ...),
        each a dict of transformers' AddedToken fields (content, special, normalized)."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE
        self.vocab, self.merges, self.pad_token, self.max_length = vocab, merges, pad_token, max_length
        self.bos_id, self.eos_id, self.pad_id = vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab[pad_token]
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                            fuse_unk=False, unk_token="<|endoftext|>"))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        # CLIP's word split (contractions, letter runs, single digits, punctuation runs), then bytes
        words = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken("<|startoftext|>", special=True), AddedToken("<|endoftext|>", special=True)])
        if pad_token != "<|endoftext|>":
            # SDXL's tokenizer_2 pads with "!", a special token in its tokenizer_config.json: transformers then reads
            # every "!" of a prompt as that token ("!" rather than "!</w>"), and so does this, to match diffusers
            tok.add_special_tokens([AddedToken(pad_token, special=True, normalized=False)])
        tok.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>",
            special_tokens=[("<|startoftext|>", self.bos_id), ("<|endoftext|>", self.eos_id)])
        self.tok = tok  # encodes whole prompts; __call__ truncates and pads, check_length reports what it drops
        # a pipeline whose tokenizer had a token added (a textual inversion saved into it) has a row for it in its
        # text encoder: the token is part of the base model, read as one id, and saved with it
        self.extra = [dict(content=d["content"], special=d.get("special", False),
                           normalized=d.get("normalized", not d.get("special", False))) for d in extra]
        for i, d in enumerate(self.extra):
            tok.add_tokens([AddedToken(d["content"], special=d["special"], normalized=d["normalized"])])
            assert tok.token_to_id(d["content"]) == len(vocab) + i, d
        self.added = []  # placeholder tokens added after loading, e.g. ["<v1>", "<v2>"]

    @classmethod
    def from_dir(cls, path):
        if os.path.exists(os.path.join(path, "vocab.json")):
            with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
                vocab = json.load(f)
            with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
                lines = f.read().split("\n")
            merges = [tuple(l.split(" ")) for l in lines if l and not l.startswith("#version")]
        elif os.path.exists(os.path.join(path, "tokenizer.json")):  # all transformers 5 saves: the same, in one file
            bpe = read_json(os.path.join(path, "tokenizer.json"))["model"]
            vocab = bpe["vocab"]
            merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in bpe["merges"]]  # "a b" or [a, b]
        else:
            raise FileNotFoundError(f"{path} has neither vocab.json and merges.txt nor tokenizer.json: not a CLIP "
                                    "tokenizer folder")
        pad = "<|endoftext|>"
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            p = os.path.join(path, name)
            if os.path.exists(p):
                with open(p, encoding="utf-8") as f:
                    v = json.load(f).get("pad_token", pad)
                pad = v["content"] if isinstance(v, dict) else v
        return cls(vocab, merges, pad_token=pad, extra=read_added_tokens(path, len(vocab)))

    def save(self, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False)
        with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))
        special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                       pad_token=self.pad_token)
        with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
            json.dump(special, f, indent=2)
        ids = {str(self.base_size - len(self.extra) + i): dict(d, lstrip=False, rstrip=False, single_word=False)
               for i, d in enumerate(self.extra)}
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(dict(special, tokenizer_class="CLIPTokenizer", model_max_length=self.max_length,
                           do_lower_case=True, errors="replace", added_tokens_decoder=ids), f, indent=2)

    @property
    def base_size(self):
        """The base model's vocabulary: the BPE vocabulary and the tokens its folder added (not the placeholders)."""
        return len(self.vocab) + len(self.extra)

    def __len__(self):
        return self.base_size + len(self.added)

    def add_tokens(self, tokens):
        """Add placeholder tokens (e.g. "<v1>"); returns their ids, which follow the vocabulary (49408, ...)."""
        from tokenizers import AddedToken
        for t in tokens:
            if t in self.vocab or t in self.added or t in [d["content"] for d in self.extra]:
                raise ValueError(f"token {t!r} is already in the vocabulary; choose another placeholder")
        # normalized=True matches what transformers' add_tokens does for non-special tokens
        self.tok.add_tokens([AddedToken(t, normalized=True) for t in tokens])
        self.added += list(tokens)
        return [self.tok.token_to_id(t) for t in tokens]

    def __call__(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = []
        for e in self.tok.encode_batch(prompts):
            ids = e.ids if len(e.ids) <= self.max_length else e.ids[:self.max_length - 1] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))  # truncation keeps BOS and EOS
        return torch.tensor(rows, dtype=torch.long)

    def check_length(self, prompts):
        """Warn about each prompt longer than max_length tokens (BOS + 75 + EOS), with what truncation drops;
        a placeholder token among the dropped ones is an error: its embedding would never be read, and its
        attention maps would be blank."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for prompt, e in zip(prompts, self.tok.encode_batch(prompts)):
            if len(e.ids) <= self.max_length:
                continue
            first = self.max_length - 1  # index of the first dropped token: BOS and 75 tokens are kept
            dropped = e.ids[first:-1]  # the final EOS is kept
            lost = [t for t in self.added if self.tok.token_to_id(t) in dropped]
            if lost:
                raise ValueError(f"prompt {prompt!r} is {len(e.ids)} tokens; CLIP reads {self.max_length}, so "
                                 f"placeholder {lost[0]!r} falls in the dropped tail. Shorten the prompt or move "
                                 f"{lost[0]!r} nearer the start.")
            text = prompt[e.offsets[first][0]:]  # offsets index the prompt as given
            print(f"warning: prompt {prompt!r} is {len(e.ids)} tokens; CLIP reads {self.max_length}, so "
                  f"{len(dropped)} tokens are dropped: {text!r}")

# -----------------------------------------------------------------------------
# CLIP text encoder (transformers' CLIPTextModel, or CLIPTextModelWithProjection for SDXL's second)

class CLIPAttention(nn.Module):
    def __init__(self, cfg, causal):
        super().__init__()
        D = cfg.hidden_size
        self.n_head, self.causal = cfg.num_attention_heads, causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, T, hs)
        # causal in the text tower (a GPT); the image tower's tokens all see each other
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))

class CLIPLayer(nn.Module):
    def __init__(self, cfg, causal):
        super().__init__()
        D = cfg.hidden_size
        self.layer_norm1 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg, causal)
        self.layer_norm2 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(D, cfg.intermediate_size), fc2=nn.Linear(cfg.intermediate_size, D)))
        self.quick = cfg.hidden_act == "quick_gelu"

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        h = self.mlp.fc1(self.layer_norm2(x))
        h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)  # quick_gelu: OpenAI CLIP's activation
        return x + self.mlp.fc2(h)

class CLIPTextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        D = cfg.hidden_size
        self.text_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(
                token_embedding=nn.Embedding(cfg.vocab_size, D),
                position_embedding=nn.Embedding(cfg.max_position_embeddings, D),
            )),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(CLIPLayer(cfg, causal=True)
                                                            for _ in range(cfg.num_hidden_layers)))),
            final_layer_norm=nn.LayerNorm(D, eps=cfg.layer_norm_eps),
        ))
        if "CLIPTextModelWithProjection" in cfg.architectures:  # the pooled embedding's projection (SDXL)
            self.text_projection = nn.Linear(D, cfg.projection_dim, bias=False)

    def resize_token_embeddings(self, n):
        """Grow the token embedding to n rows for placeholder tokens; old rows are kept, new rows are zero."""
        old = self.text_model.embeddings.token_embedding
        if n < old.num_embeddings:
            raise ValueError(f"cannot shrink the token embedding from {old.num_embeddings} to {n} rows")
        new = nn.Embedding(n, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:old.num_embeddings] = old.weight
        self.text_model.embeddings.token_embedding = new
        self.config.vocab_size = n

    def hidden_state(self, ids, n_layers=None):
        """(B, T) ids -> (B, T, D): the output of the first n_layers layers (all by default), not normed."""
        m = self.text_model
        x = m.embeddings.token_embedding(ids) + m.embeddings.position_embedding.weight[:ids.shape[1]]
        for layer in m.encoder.layers[:n_layers]:
            x = layer(x)
        return x

    def forward(self, ids):
        """(B, T) ids -> (B, T, D) last hidden state after the final layer norm (what SD1.5 conditions on)."""
        return self.text_model.final_layer_norm(self.hidden_state(ids))

    def penultimate(self, ids):
        """(B, T) ids -> (B, T, D) the second-to-last layer's output, not normed: each of SDXL's two encoders
        gives its part of the context this way (transformers' hidden_states[-2])."""
        return self.hidden_state(ids, -1)

    def penultimate_and_pooled(self, ids, eos_id):
        """(B, T) ids -> (penultimate (B, T, D), pooled (B, projection_dim)): the second text encoder's two outputs
        in SDXL. pooled: the last hidden state (final layer norm) at each prompt's first EOS token, through
        text_projection. OpenCLIP pools at ids.argmax(-1), the EOS token being the largest id of its vocabulary
        (so does transformers for files with eos_token_id 2, as SDXL's); placeholder tokens added after it would
        win that argmax, so the EOS is looked up by id."""
        h = self.hidden_state(ids, -1)
        last = self.text_model.final_layer_norm(self.text_model.encoder.layers[-1](h))
        pooled = last[torch.arange(ids.shape[0], device=ids.device), (ids == eos_id).int().argmax(-1)]
        return h, self.text_projection(pooled)

# -----------------------------------------------------------------------------
# CLIP image encoder (transformers' CLIPVisionModelWithProjection), for CLIP image scores

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel normalisation (clip/clip.py)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

def clip_preprocess(images, size=224):
    """(B, 3, H, W) RGB in [0, 1] -> (B, 3, size, size) CLIP input, as CLIPImageProcessor makes it: shortest
    side to size (bicubic), centre crop, CLIP mean and std."""
    if not images.is_floating_point():
        raise TypeError(f"clip_preprocess takes float RGB in [0, 1], got {images.dtype}: divide 8-bit images by 255")
    H, W = images.shape[-2:]
    long = int(size * max(H, W) / min(H, W))  # rounded down, as transformers does
    h, w = (size, long) if H <= W else (long, size)
    # antialias=True is PIL's bicubic (a = -0.5, kernel widened when downscaling) in both directions. PIL
    # resizes width first, then height, clipping the kernel's overshoot to 8 bits after each pass: so here too
    x = images.float()
    for hw in ((H, w), (h, w)):
        x = F.interpolate(x, size=hw, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (h - size) // 2, (w - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean, std = (torch.tensor(v, device=x.device).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (x - mean) / std

class CLIPVisionEmbeddings(nn.Module):
    """Pixels -> tokens: a learned class token, then one token per patch (row by row), plus learned positions."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(D))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, D, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, D)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, 1 + N, D)

class CLIPVisionModel(nn.Module):
    """CLIP's image tower: a ViT whose class token, normed and projected, is the image embedding."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        D = cfg.hidden_size
        self.vision_model = nn.ModuleDict(dict(
            embeddings=CLIPVisionEmbeddings(cfg),
            pre_layrnorm=nn.LayerNorm(D, eps=cfg.layer_norm_eps),  # sic: the checkpoint key is spelled pre_layrnorm
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(CLIPLayer(cfg, causal=False)
                                                            for _ in range(cfg.num_hidden_layers)))),
            post_layernorm=nn.LayerNorm(D, eps=cfg.layer_norm_eps),
        ))
        self.visual_projection = nn.Linear(D, cfg.projection_dim, bias=False)

    def forward(self, pixel_values):
        """(B, 3, S, S) pixels from clip_preprocess -> (B, projection_dim) image embedding, not normalised."""
        S = self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (S, S):
            raise ValueError(f"the CLIP image tower takes {S}x{S} pixels, got {tuple(pixel_values.shape[-2:])}; "
                             f"prepare images with clip_preprocess(images, size={S})")
        m = self.vision_model
        x = m.pre_layrnorm(m.embeddings(pixel_values.to(self.visual_projection.weight.dtype)))
        for layer in m.encoder.layers:
            x = layer(x)
        return self.visual_projection(m.post_layernorm(x[:, 0]))  # the class token stands for the image

    @classmethod
    def from_pretrained(cls, name_or_dir=CLIP_REPO, device="cpu", dtype=torch.float32):
        """
        Load from a folder with config.json and model.safetensors (a CLIPVisionModelWithProjection, or a full
        CLIP model whose text tower is skipped), a Hub repo id (only those two files are fetched), or "tiny"
        (a small random tower built and saved on first use; 32 px inputs).
        """
        folder = tower_folder(cls, name_or_dir, CLIP_REPO, "tiny-clip", ("model.safetensors",))
        return load_tower(cls, VisionConfig, "image_encoder", folder, ("model.safetensors",), device, dtype)

    def save_pretrained(self, path):
        """Write config.json and model.safetensors; transformers' CLIPVisionModelWithProjection reads them."""
        save_tower(self, path, {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model"})

    @classmethod
    def tiny(cls, seed=0):
        """A small random image tower (32 px, 8 px patches, 2 layers). The same seed gives the same weights;
        the caller's global random state is left as it was."""
        with seeded_init(seed):
            m = cls(VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=32, patch_size=8, projection_dim=16))
        return m.eval().requires_grad_(False)

# -----------------------------------------------------------------------------
# DINO's ViT (transformers' ViTModel, the layout facebook/dino-vitb8 ships), for the general-object losses

DINO_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics: DINO's pixel normalisation
DINO_STD = (0.229, 0.224, 0.225)

def dino_preprocess(images, size=224):
    """(B, 3, H, W) RGB in [0, 1] -> (B, 3, size, size) DINO input: the whole image resized (bilinear, antialiased;
    no crop, as DINO feature work does), then ImageNet mean and std. Differentiable: x0_hat goes through it.
    DiffuseIT resizes the shorter side to 224 instead, which is the same for square images."""
    if not images.is_floating_point():
        raise TypeError(f"dino_preprocess takes float RGB in [0, 1], got {images.dtype}: divide 8-bit images by 255")
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean, std = (torch.tensor(v, device=x.device).view(3, 1, 1) for v in (DINO_MEAN, DINO_STD))
    return (x - mean) / std

class ViTEmbeddings(nn.Module):
    """Pixels -> [CLS] then one token per patch (row by row), plus learned positions, resampled for other sizes."""

    def __init__(self, cfg):
        super().__init__()
        D, n = cfg.hidden_size, cfg.image_size // cfg.patch_size
        # (1, 1, D) and (1, 1 + n*n, D): the checkpoint stores both with a batch axis
        self.cls_token = nn.Parameter(torch.randn(1, 1, D))
        self.position_embeddings = nn.Parameter(torch.randn(1, 1 + n * n, D))
        # patch_embeddings.projection: a naming level of the checkpoint's
        self.patch_embeddings = nn.ModuleDict(dict(
            projection=nn.Conv2d(cfg.num_channels, D, cfg.patch_size, stride=cfg.patch_size)))

    def positions(self, h, w):
        """(1, 1 + h*w, D) position embeddings for an h x w grid of patches: the trained n x n grid resampled
        bicubically (DINO's interpolate_pos_encoding), the [CLS] position kept as it is."""
        pos = self.position_embeddings
        n, D = math.isqrt(pos.shape[1] - 1), pos.shape[2]
        if (h, w) == (n, n):
            return pos
        grid = pos[:, 1:].reshape(1, n, n, D).permute(0, 3, 1, 2)
        # to the target size, as transformers does; DINO's code passes scale_factor (w + 0.1) / n instead, which
        # moves the sampling points by a fraction of a pixel
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, D)], dim=1)

    def forward(self, pixel_values):
        x = self.patch_embeddings.projection(pixel_values)  # (B, D, h, w)
        h, w = x.shape[-2:]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        return x + self.positions(h, w)  # (B, 1 + h*w, D)

class ViTLayer(nn.Module):
    """A pre-norm transformer block that also hands back its attention keys (the structure losses read them)."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.layernorm_before = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        # attention.attention.{query,key,value} and attention.output.dense: the checkpoint's (BERT-style) nesting
        self.attention = nn.ModuleDict(dict(
            attention=nn.ModuleDict(dict(query=nn.Linear(D, D), key=nn.Linear(D, D), value=nn.Linear(D, D))),
            output=nn.ModuleDict(dict(dense=nn.Linear(D, D))),
        ))
        self.layernorm_after = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        # the MLP's two linears, which the checkpoint names intermediate.dense and output.dense
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(D, cfg.intermediate_size)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(cfg.intermediate_size, D)))

    def forward(self, x):
        """(B, T, D) -> (B, T, D), and this layer's keys (B, nh, T, hs)."""
        B, T, D = x.shape
        a = self.attention.attention
        h = self.layernorm_before(x)
        q, k, v = (p(h).view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for p in (a.query, a.key, a.value))
        y = F.scaled_dot_product_attention(q, k, v)  # every token sees every token
        x = x + self.attention.output.dense(y.transpose(1, 2).reshape(B, T, D))
        # exact (erf) GELU: nn.GELU in DINO's code, "gelu" in transformers
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x)))), k

class ViT(nn.Module):
    """DINO's ViT: pixels -> the last hidden state (after the final layer norm), and the last layer's keys."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = ViTEmbeddings(cfg)
        # encoder.layer.N: a naming level of the checkpoint's, singular `layer` included
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList(ViTLayer(cfg) for _ in range(cfg.num_hidden_layers))))
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def last_block(self, pixel_values):
        """(B, 3, H, W) pixels from dino_preprocess -> (the last block's output (B, 1 + N, D), before the final
        layernorm: [CLS], then the N patches row by row; its keys (B, heads, 1 + N, head_dim): its key projection
        of its layernorm_before output). What DiffuseIT's hooks on the blocks read, for eq. 11. Sizes other than
        config.image_size resample the position embeddings."""
        x = self.embeddings(pixel_values.to(self.layernorm.weight.dtype))
        for layer in self.encoder.layer:
            x, k = layer(x)
        return x, k

    def forward(self, pixel_values):
        """last_block's output through the final layernorm: transformers' last_hidden_state."""
        return self.layernorm(self.last_block(pixel_values)[0])

    @classmethod
    def from_pretrained(cls, name_or_dir=DINO_REPO, device="cpu", dtype=torch.float32):
        """
        Load from a folder with config.json and model.safetensors or pytorch_model.bin (a transformers ViTModel,
        as facebook/dino-vitb8 is stored; safetensors preferred), a Hub repo id (only those files are fetched), or
        "tiny" (a small random ViT built and saved on first use; 32 px inputs).
        """
        weights = ("model.safetensors", "pytorch_model.bin")
        folder = tower_folder(cls, name_or_dir, DINO_REPO, "tiny-dino", weights)
        return load_tower(cls, ViTConfig, "dino", folder, weights, device, dtype)

    def save_pretrained(self, path):
        """Write config.json and model.safetensors (the Hub file's key names), which transformers' ViTModel reads."""
        save_tower(self, path, {"architectures": ["ViTModel"], "model_type": "vit", "hidden_act": "gelu"})

    @classmethod
    def tiny(cls, seed=0):
        """A small random ViT (32 px, 8 px patches, 2 layers of 2 heads). The same seed gives the same weights;
        the caller's global random state is left as it was."""
        with seeded_init(seed):
            m = cls(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              image_size=32, patch_size=8))
        return m.eval().requires_grad_(False)

# -----------------------------------------------------------------------------
# building blocks shared by the UNet and the VAE

class ResnetBlock2D(nn.Module):
    def __init__(self, cin, cout, groups, eps, temb=None):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        if temb is not None:  # the VAE's resnets have no timestep input
            self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x, temb=None):
        # Without autograd (sampling, decoding) the activations and the residual sum overwrite their inputs:
        # fewer fresh buffers, which takes a seventh off the VAE decode on the CPU. In training silu keeps its input.
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        if temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        skip = self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x
        return h.add_(skip) if inplace else skip + h

def checkpointed(enabled, module, *args):
    """module(*args); with enabled, in training, its activations are recomputed in the backward pass
    instead of stored (gradient checkpointing: less memory, about a third more compute)."""
    if enabled and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)

class Downsample2D(nn.Module):
    def __init__(self, c, padding):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:  # the VAE pads right and bottom only, then convolves without padding
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)

class Upsample2D(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, size=None):
        # nearest 2x, or to the size of the skip it meets (odd sizes in the UNet)
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x)

# -----------------------------------------------------------------------------
# attention, and the recorder the attention-refocusing loss reads

class AttentionRecorder:
    """
    Records cross-attention probabilities, WITH gradient, for chosen tokens.

    ids: (B, 77) the prompt ids the UNet is conditioned on; token_ids: the vocabulary ids
    to watch (e.g. [<v1>, <v2>]); resolutions: side lengths of the feature maps to
    record (SD1.5 at 512 px has 64, 32, 16, 8; the official code uses 16, which
    picks the 5 layers of down_blocks.2 and up_blocks.1, not the 8x8 mid block).
    After a UNet forward inside `with unet.record_attention(rec):`, rec.maps holds
    one (B, heads, h, w, K) tensor per recorded layer and rec.names their modules.
    A token that appears several times in a prompt gets the sum of its columns;
    a token absent from a prompt gets zeros.
    """

    def __init__(self, ids, token_ids, resolutions=(16,)):
        self.select = torch.stack([(ids == t) for t in token_ids], dim=-1).float()  # (B, 77, K)
        self.resolutions = set(resolutions)
        self.maps, self.names = [], []
        self.replaying = False  # set while a checkpointed block runs again in the backward pass

    def wants(self, hw):
        return min(hw) in self.resolutions or max(hw) in self.resolutions

    def add(self, name, probs, hw):
        B = self.select.shape[0]
        probs = probs.view(B, -1, hw[0] * hw[1], probs.shape[-1])  # (B, heads, hw, 77)
        with torch.autocast(probs.device.type, enabled=False):  # kept fp32: autocast would cast the matmul down
            cols = probs @ self.select.to(probs)[:, None]  # (B, heads, hw, K)
        if not self.replaying:  # (a replay computes the same, to rebuild what the backward pass needs)
            self.maps.append(cols.view(B, cols.shape[1], hw[0], hw[1], -1))
            self.names.append(name)

class Attention(nn.Module):
    def __init__(self, dim, heads, context_dim=None, bias=False):
        super().__init__()
        self.heads = heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # a list of one: the checkpoint key is to_out.0
        self.recorder, self.name = None, ""  # set by UNet.record_attention

    def forward(self, x, context=None, hw=None):
        B, T, C = x.shape
        context = x if context is None else context
        q, k, v = (t.view(B, -1, self.heads, C // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))  # (B, nh, T, hs)
        rec = self.recorder
        if rec is not None and rec.wants(hw):
            # explicit softmax so the probabilities exist as a tensor; fp32 for the recorded copy
            probs = ((q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)).float().softmax(dim=-1)
            rec.add(self.name, probs, hw)
            y = probs.to(v.dtype) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](y.transpose(1, 2).reshape(B, T, C))

class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)

class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)  # self-attention over pixels
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)  # cross-attention to the 77 text tokens
        self.norm3 = nn.LayerNorm(dim)
        # net.1 is a dropout in the checkpoint's module list: Identity keeps the index of net.2
        self.ff = nn.ModuleDict(dict(net=nn.ModuleList([GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim)])))

    def forward(self, x, context, hw):
        x = x + self.attn1(self.norm1(x), hw=hw)
        x = x + self.attn2(self.norm2(x), context, hw=hw)
        h = self.norm3(x)
        for layer in self.ff.net:  # GEGLU, (dropout), Linear
            h = layer(h)
        return x + h

class Transformer2DModel(nn.Module):
    """A spatial transformer: the checkpoint calls each one `attentions.N`. depth blocks in a row (1 in SD1.x;
    SDXL's transformer_layers_per_block: 2 and 10)."""

    def __init__(self, c, heads, context_dim, groups, depth=1, linear=False):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        # the same per-pixel map stored two ways: 1x1 convs in SD1.x, Linear in SD2 and SDXL (use_linear_projection)
        self.linear = linear
        self.proj_in = nn.Linear(c, c) if linear else nn.Conv2d(c, c, 1)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(c, heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(c, c) if linear else nn.Conv2d(c, c, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        tokens = lambda m: m.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, C, H, W) -> (B, HW, C)
        image = lambda t: t.reshape(B, H, W, C).permute(0, 3, 1, 2)  # and back
        h = self.norm(x)
        h = self.proj_in(tokens(h)) if self.linear else tokens(self.proj_in(h))
        for block in self.transformer_blocks:
            h = block(h, context, (H, W))
        return x + (image(self.proj_out(h)) if self.linear else self.proj_out(image(h)))

# -----------------------------------------------------------------------------
# UNet (diffusers' UNet2DConditionModel, SD1.x and SDXL configurations)

def timestep_embedding(t, dim):
    """Sinusoidal embedding of the timestep, cos first (flip_sin_to_cos=True, freq_shift=0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch, L, G, eps = cfg.block_out_channels, cfg.layers_per_block, cfg.norm_num_groups, cfg.norm_eps
        heads = cfg.attention_head_dim  # per level, or one for all (the mid block takes the last level's)
        heads = list(heads) if isinstance(heads, tuple) else [heads] * len(ch)
        depth = cfg.transformer_layers_per_block  # the same: per level, or one for all
        depth = list(depth) if isinstance(depth, tuple) else [depth] * len(ch)
        temb = ch[0] * 4
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = nn.ModuleDict(dict(linear_1=nn.Linear(ch[0], temb), linear_2=nn.Linear(temb, temb)))
        if cfg.addition_embed_type == "text_time":  # SDXL: the pooled text and 6 size sinusoids, into temb
            self.add_embedding = nn.ModuleDict(dict(linear_1=nn.Linear(cfg.projection_class_embeddings_input_dim, temb),
                                                    linear_2=nn.Linear(temb, temb)))

        def attention(level, c):
            return Transformer2DModel(c, heads[level], cfg.cross_attention_dim, G, depth[level], cfg.use_linear_projection)

        # down path; `skips` tracks the channels of every tensor saved for the up path
        self.down_blocks, skips, cin = nn.ModuleList(), [ch[0]], ch[0]
        for i, (c, kind) in enumerate(zip(ch, cfg.down_block_types)):
            block = nn.ModuleDict(dict(resnets=nn.ModuleList()))
            if kind == "CrossAttnDownBlock2D":
                block.attentions = nn.ModuleList()
            for j in range(L):
                block.resnets.append(ResnetBlock2D(cin if j == 0 else c, c, G, eps, temb))
                if "attentions" in block:
                    block.attentions.append(attention(i, c))
                skips.append(c)
            if i < len(ch) - 1:
                block.downsamplers = nn.ModuleList([Downsample2D(c, padding=1)])
                skips.append(c)
            self.down_blocks.append(block)
            cin = c
        self.mid_block = nn.ModuleDict(dict(
            resnets=nn.ModuleList([ResnetBlock2D(ch[-1], ch[-1], G, eps, temb) for _ in range(2)]),
            attentions=nn.ModuleList([attention(-1, ch[-1])]),
        ))
        # up path: each resnet eats one skip, in reverse order; up block i is level len(ch) - 1 - i
        self.up_blocks, rch = nn.ModuleList(), ch[::-1]
        for i, (c, kind) in enumerate(zip(rch, cfg.up_block_types)):
            block = nn.ModuleDict(dict(resnets=nn.ModuleList()))
            if kind == "CrossAttnUpBlock2D":
                block.attentions = nn.ModuleList()
            for j in range(L + 1):
                block.resnets.append(ResnetBlock2D(cin + skips.pop(), c, G, eps, temb))
                if "attentions" in block:
                    block.attentions.append(attention(len(ch) - 1 - i, c))
                cin = c
            if i < len(ch) - 1:
                block.upsamplers = nn.ModuleList([Upsample2D(c)])
            self.up_blocks.append(block)
        self.conv_norm_out = nn.GroupNorm(G, ch[0], eps=eps)  # a GroupNorm, despite the name
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    @contextmanager
    def record_attention(self, recorder):
        """Inside this block, cross-attention layers report their probabilities to `recorder`."""
        attns = [(n, m) for n, m in self.named_modules() if n.endswith("attn2")]
        for n, m in attns:
            m.recorder, m.name = recorder, n
        try:
            yield recorder
        finally:
            for _, m in attns:
                m.recorder = None

    def _run(self, module, *args):
        rec = module.transformer_blocks[0].attn2.recorder if isinstance(module, Transformer2DModel) else None
        if rec is None or not rec.wants(args[0].shape[-2:]) or not self.gradient_checkpointing:
            return checkpointed(self.gradient_checkpointing, module, *args)
        if torch.compiler.is_compiling():  # it cannot trace a checkpointed block that reports to the recorder
            return module(*args)
        # A checkpointed block runs again in the backward pass, after record_attention has detached the
        # recorder: the recorder goes with it, so that it takes the same path (explicit softmax), and keeps
        # nothing of that replay. Its maps keep their gradient (non-reentrant checkpointing recomputes them too).
        calls = []

        def run(*a):
            before = module.transformer_blocks[0].attn2.recorder
            for b in module.transformer_blocks:
                b.attn2.recorder = rec
            rec.replaying = bool(calls)  # every call after the first is a replay
            calls.append(1)
            try:
                return module(*a)
            finally:
                rec.replaying = False
                for b in module.transformer_blocks:
                    b.attn2.recorder = before
        return checkpointed(self.gradient_checkpointing, run, *args)

    def cross_attention_sides(self, side):
        """The sides of the cross-attention maps for square latents of this side, largest first (what an
        AttentionRecorder's resolutions pick from): each level halves the side, rounding up; the up path mirrors
        the down path; the mid block sits at the last level."""
        levels = [side]
        for _ in self.config.down_block_types[1:]:
            levels.append(-(-levels[-1] // 2))
        kinds = zip(levels + levels[::-1], self.config.down_block_types + self.config.up_block_types)
        return sorted({s for s, kind in kinds if kind.startswith("CrossAttn")} | {levels[-1]}, reverse=True)

    def forward(self, x, t, context, added_cond=None):
        """x: (B, 4, h, w) noisy latents, t: timesteps (B,) or scalar, context: (B, 77, D) -> predicted noise.
        added_cond (SDXL's UNet only; diffusers' added_cond_kwargs): dict(text_embeds=(B, 1280) pooled text,
        time_ids=(B, 6) original height and width, crop top and left, target height and width)."""
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        emb = timestep_embedding(t, self.config.block_out_channels[0]).to(x.dtype)
        emb = self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(emb)))
        xl = self.config.addition_embed_type == "text_time"
        if xl != (added_cond is not None):
            raise ValueError("an SDXL UNet (addition_embed_type='text_time') takes added_cond=dict(text_embeds=..., "
                             "time_ids=...), as StableDiffusion.encode_prompts returns it; an SD1.x UNet takes none")
        if xl:  # each size number gets its own sinusoid, as the timestep does
            sizes = timestep_embedding(added_cond["time_ids"].flatten(), self.config.addition_time_embed_dim)
            a = torch.cat([added_cond["text_embeds"], sizes.reshape(B, -1)], dim=-1).to(emb.dtype)
            emb = emb + self.add_embedding.linear_2(F.silu(self.add_embedding.linear_1(a)))
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            for j, resnet in enumerate(block.resnets):
                x = self._run(resnet, x, emb)
                if "attentions" in block:
                    x = self._run(block.attentions[j], x, context)
                skips.append(x)
            if "downsamplers" in block:
                x = block.downsamplers[0](x)
                skips.append(x)
        x = self._run(self.mid_block.resnets[0], x, emb)
        x = self._run(self.mid_block.attentions[0], x, context)
        x = self._run(self.mid_block.resnets[1], x, emb)
        for block in self.up_blocks:
            for j, resnet in enumerate(block.resnets):
                x = self._run(resnet, torch.cat([x, skips.pop()], dim=1), emb)
                if "attentions" in block:
                    x = self._run(block.attentions[j], x, context)
            if "upsamplers" in block:
                x = block.upsamplers[0](x, skips[-1].shape[-2:])
        return self.conv_out(F.silu(self.conv_norm_out(x)))

# -----------------------------------------------------------------------------
# VAE (diffusers' AutoencoderKL)

class VAEAttention(nn.Module):
    """The VAE mid block's single-head self-attention over all pixels, with its own norm and residual."""

    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # checkpoint key to_out.0

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)[:, None]  # (B, 1, HW, C), from either layout
        y = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))
        return x + self.to_out[0](y[:, 0]).transpose(1, 2).view(B, C, H, W)

def vae_mid_block(c, groups):
    return nn.ModuleDict(dict(
        resnets=nn.ModuleList([ResnetBlock2D(c, c, groups, 1e-6) for _ in range(2)]),
        attentions=nn.ModuleList([VAEAttention(c, groups)]),
    ))

def run_mid_block(mid, x):
    return mid.resnets[1](mid.attentions[0](mid.resnets[0](x)))

class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        ch, L, G = cfg.block_out_channels, cfg.layers_per_block, cfg.norm_num_groups
        eps = 1e-6  # every GroupNorm in the VAE
        down, cin = nn.ModuleList(), ch[0]
        for i, c in enumerate(ch):
            block = nn.ModuleDict(dict(resnets=nn.ModuleList(ResnetBlock2D(cin if j == 0 else c, c, G, eps) for j in range(L))))
            if i < len(ch) - 1:
                block.downsamplers = nn.ModuleList([Downsample2D(c, padding=0)])
            down.append(block)
            cin = c
        self.encoder = nn.ModuleDict(dict(
            conv_in=nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1),
            down_blocks=down,
            mid_block=vae_mid_block(ch[-1], G),
            conv_norm_out=nn.GroupNorm(G, ch[-1], eps=eps),
            conv_out=nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1),  # mean and log-variance
        ))
        up, cin = nn.ModuleList(), ch[-1]
        for i, c in enumerate(ch[::-1]):
            block = nn.ModuleDict(dict(resnets=nn.ModuleList(ResnetBlock2D(cin if j == 0 else c, c, G, eps) for j in range(L + 1))))
            if i < len(ch) - 1:
                block.upsamplers = nn.ModuleList([Upsample2D(c)])
            up.append(block)
            cin = c
        self.decoder = nn.ModuleDict(dict(
            conv_in=nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1),
            mid_block=vae_mid_block(ch[-1], G),
            up_blocks=up,
            conv_norm_out=nn.GroupNorm(G, ch[0], eps=eps),
            conv_out=nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1),
        ))
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.gradient_checkpointing = False  # for decoding with gradient (the identity loss)

    def encode(self, x):
        """Images in [-1, 1] (B, 3, H, W) -> (mean, logvar) of the posterior, each (B, 4, H/8, W/8), unscaled."""
        e = self.encoder
        h = e.conv_in(x)
        for block in e.down_blocks:
            for resnet in block.resnets:
                h = resnet(h)
            if "downsamplers" in block:
                h = block.downsamplers[0](h)
        h = run_mid_block(e.mid_block, h)
        h = self.quant_conv(e.conv_out(F.silu(e.conv_norm_out(h))))
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """Unscaled latents (B, 4, h, w) -> images in [-1, 1] (B, 3, 8h, 8w). Divide SD latents by scaling_factor first."""
        d, ckpt = self.decoder, self.gradient_checkpointing
        if z.device.type == "cpu" and not torch.is_grad_enabled():
            # Decoding samples on the CPU: oneDNN's convolutions run a fifth faster on channels-last tensors, and
            # the CPU's GroupNorm keeps that layout. CUDA's GroupNorm copies it back to NCHW at every norm, so there
            # the latents stay as they are; so they do for eq. 7's decode with gradient, whose backward gains less
            # and whose sums would then depend more on how many images are decoded at once.
            z = z.contiguous(memory_format=torch.channels_last)
        h = checkpointed(ckpt, lambda x: run_mid_block(d.mid_block, x), d.conv_in(self.post_quant_conv(z)))
        for block in d.up_blocks:
            for resnet in block.resnets:
                h = checkpointed(ckpt, resnet, h)
            if "upsamplers" in block:
                h = checkpointed(ckpt, block.upsamplers[0], h)
        return d.conv_out(F.silu(d.conv_norm_out(h))).contiguous()

# -----------------------------------------------------------------------------
# noise schedule and DDIM

def noise_like(x, generator=None):
    """Standard normal noise of x's shape: from one generator for the whole batch, or from a list of them, one per
    image (each image's noise then depends on its own seed only, whatever it is batched with)."""
    if isinstance(generator, list):
        return torch.cat([torch.randn((1, *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype)
                          for g in generator])
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

class Schedule:
    """The training noise schedule (DDPM, 1000 steps) and the DDIM sampler's step."""

    def __init__(self, cfg: ScheduleConfig):
        self.config = cfg
        T = cfg.num_train_timesteps
        if cfg.beta_schedule == "scaled_linear":  # linear in sqrt(beta): SD's schedule
            betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()  # abar_t, (T,)
        # the abar the last DDIM step lands on: 1 ("alpha to one") or abar_0, as SD1.5 configures it
        self.final_alpha = 1.0 if cfg.set_alpha_to_one else self.alphas_cumprod[0].item()
        self._copies = {}

    def alphas_cumprod_on(self, device):
        """alphas_cumprod on `device`, copied there once: a copy at each training step would wait for the host."""
        device = torch.device(device)
        if device not in self._copies:
            self._copies[device] = self.alphas_cumprod.to(device)
        return self._copies[device]

    def abar(self, t, like):
        return self.alphas_cumprod_on(like.device)[t].to(like.dtype).view(-1, *[1] * (like.dim() - 1))

    def add_noise(self, x0, noise, t):
        """q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_x0(self, z_t, eps, t):
        """Eq. 7's z0_hat, Tweedie's estimate of the clean latent: z0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t),
        add_noise solved for x0. t: one timestep (int) or (B,) timesteps, one per sample. Computed in float32
        or wider (in bf16, abar_t itself would be off by up to 0.4%) and returned in z_t's dtype."""
        a = self.alphas_cumprod_on(z_t.device).to(torch.promote_types(z_t.dtype, torch.float32))[t]
        a = a.view(-1, *[1] * (z_t.dim() - 1))  # (B or 1, 1, 1, 1)
        return ((z_t - (1 - a).sqrt() * eps) / a.sqrt()).to(z_t.dtype)

    def ddim_timesteps(self, steps):
        """'leading' spacing + steps_offset: for 50 steps, 981, 961, ..., 1."""
        most = self.config.num_train_timesteps - self.config.steps_offset  # more would step past the last timestep
        if not 1 <= steps <= most:
            raise ValueError(f"DDIM takes 1 to {most} steps (the schedule has {self.config.num_train_timesteps} "
                             f"timesteps), got {steps}")
        ratio = self.config.num_train_timesteps // steps
        return (torch.arange(steps - 1, -1, -1) * ratio + self.config.steps_offset).tolist()

    def ddim_step(self, x, eps, t, t_prev, eta=0.0, generator=None):
        """One DDIM update x_t -> x_{t_prev} (Song et al. 2021, eq. 12)."""
        a = self.alphas_cumprod[t].item()
        a_prev = self.alphas_cumprod[t_prev].item() if t_prev >= 0 else self.final_alpha
        x0 = self.predict_x0(x, eps, t)
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
        if sigma > 0:
            x_prev = x_prev + sigma * noise_like(x, generator)
        return x_prev

    def euler_sigmas(self, steps):
        """Euler ancestral's schedule, as diffusers' EulerAncestralDiscreteScheduler sets it from the model's
        scheduler config -> (timesteps, their noise levels sigma = sqrt((1 - abar) / abar) then a final 0, the
        scale of the starting noise). Without a timestep_spacing (SD1.5's file; the official MagiCapture
        inference): 'linspace', `steps` timesteps evenly from T-1 down to 0, sigma interpolated between integer
        timesteps, starting at the largest sigma. With 'leading' (SDXL's): DDIM's timesteps, starting at
        sqrt(sigma^2 + 1), the variance of z_T / sqrt(abar_T)."""
        T = self.config.num_train_timesteps
        abar = self.alphas_cumprod.double()
        sig = ((1 - abar) / abar).sqrt()
        if self.config.timestep_spacing == "leading":
            t = torch.tensor(self.ddim_timesteps(steps), dtype=torch.float64)
            sigmas = sig[t.long()]
            start = (sigmas[0] ** 2 + 1).sqrt()
        else:
            t = torch.linspace(0, T - 1, steps, dtype=torch.float64).flip(0)
            lo = t.floor().long()
            w = t - lo
            sigmas = sig[lo] * (1 - w) + sig[(lo + 1).clamp(max=T - 1)] * w
            start = sigmas[0]
        return (t.float().tolist(), torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).float().tolist(),
                start.item())

    def euler_ancestral_step(self, x, eps, sigma, sigma_next, generator=None):
        """One Euler ancestral step in sigma space (Karras et al. 2022; k-diffusion): an Euler step down to
        sigma_down, then fresh noise of sigma_up, where sigma_down^2 + sigma_up^2 = sigma_next^2.

        Here x = z_t / sqrt(abar) and sigma = sqrt((1 - abar) / abar), so predict_x0's estimate reads
        x0 = x - sigma eps, and the slope of the probability-flow ODE, dx/dsigma = (x - x0) / sigma, is eps
        itself: the step needs no x0."""
        up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        down = (sigma_next ** 2 - up ** 2) ** 0.5
        x = x + eps * (down - sigma)
        if up > 0:
            x = x + up * noise_like(x, generator)
        return x

# -----------------------------------------------------------------------------
# the pipeline: loading, saving, sampling

PARTS = {  # folder: (config file, weights file stem, module, config)
    "unet": ("config.json", "diffusion_pytorch_model", UNet, UNetConfig),
    "vae": ("config.json", "diffusion_pytorch_model", AutoencoderKL, VAEConfig),
    "text_encoder": ("config.json", "model", CLIPTextModel, TextConfig),
    "text_encoder_2": ("config.json", "model", CLIPTextModel, TextConfig),  # SDXL only
}

def pipeline_parts(index):
    """The parts a pipeline folder holds: SD1.5's three, and text_encoder_2 where model_index.json lists it (SDXL)."""
    return [p for p in PARTS if p != "text_encoder_2" or p in index]

def weights_name(part, variant=None):
    stem = PARTS[part][1]
    return f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"

def weight_files(folder, part, variant=None):
    """A pipeline part's weight files: its one .safetensors, or the shards its index lists (diffusers and
    transformers split a file over their size limit, 10 GB for diffusers: SDXL's UNet saved in fp32)."""
    single = os.path.join(folder, part, weights_name(part, variant))
    index = os.path.join(folder, part, f"{PARTS[part][1]}.safetensors.index{'.' + variant if variant else ''}.json")
    if os.path.exists(single):
        return [single]
    if os.path.exists(index):
        return [os.path.join(folder, part, f) for f in sorted(set(read_json(index)["weight_map"].values()))]
    pickled = glob.glob(os.path.join(folder, part, "*.bin"))
    raise FileNotFoundError(f"{single} is missing" + (f" (no '{variant}' variant? --variant=None reads the "
                                                      "plain files)" if variant else "") + (
        f"; {os.path.basename(pickled[0])} is there, but only .safetensors files are read (a pickled .bin can run "
        "code): convert the folder with diffusers, from_pretrained(folder).save_pretrained(new_folder)"
        if pickled else ""))

def read_safetensors(path):
    """(tensors, header metadata) of a .safetensors file; a file that cannot be read is named."""
    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable .safetensors file ({e}): cut short, or a git-lfs pointer "
                         "instead of the file? Download or write it again") from None

def fix_legacy_keys(part, sd):
    """The one place where file keys differ from module paths; everything else loads as named."""
    if part in ("text_encoder", "text_encoder_2"):
        sd.pop("text_model.embeddings.position_ids", None)  # a buffer of 0..76 in older files, not a weight
        sd.pop("embeddings.position_ids", None)
        if not any(k.startswith("text_model.") for k in sd):  # transformers 5's CLIPTextModel saves without it
            sd = {"text_model." + k: v for k, v in sd.items()}
    if part == "image_encoder":
        # the full CLIP file holds both towers: drop the text tower, its projection and the logit scale
        sd = {k: v for k, v in sd.items() if not k.startswith(("text_model.", "text_projection.", "logit_scale"))}
        sd.pop("vision_model.embeddings.position_ids", None)  # a buffer of 0..256 in older files, not a weight
    if part == "dino":
        # DINO has no pooler; transformers' ViTModel adds one (dense + tanh on [CLS], never trained by DINO) and
        # files it saves carry pooler.dense.*
        sd = {k: v for k, v in sd.items() if not k.startswith("pooler.")}
    if part == "vae":  # older diffusers names of the mid-block attention
        legacy = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
        out = {}
        for k, v in sd.items():
            for old, new in legacy.items():
                if old in k:
                    k = k.replace(old, new)
                    v = v.squeeze(-1).squeeze(-1) if v.dim() == 4 else v  # 1x1 conv weights in the oldest files
            out[k] = v
        sd = out
    return sd

def load_strict(module, sd, path):
    """load_state_dict(strict=True), with an error that names the first mismatching keys and the file."""
    want = module.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(want[k].shape)}"
              for k in want if k in sd and sd[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        msg = [f"{path} does not match the model built from its config.json:"]
        for name, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                msg.append(f"  {len(items)} {name}, e.g. " + ", ".join(items[:5]))
        raise ValueError("\n".join(msg))
    module.load_state_dict(sd, strict=True, assign=True)

def read_json(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: a diffusers-layout model folder needs it")
    with open(path) as f:
        return json.load(f)

def hub_download(repo_id, variant=None):
    """Fetch only the files the pipeline needs (no safety checker, no .ckpt) through huggingface_hub's cache."""
    from huggingface_hub import errors, snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE
    patterns = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "tokenizer_2/*"]
    patterns += [f"{p}/{PARTS[p][0]}" for p in PARTS] + [f"{p}/{weights_name(p, variant)}" for p in PARTS]
    # a part split in shards: its index and the shards it lists, as diffusers and transformers name them
    dot = f".{variant}" if variant else ""
    patterns += [f"{p}/{PARTS[p][1]}.safetensors.index{dot}.json" for p in PARTS]
    patterns += [f"{p}/{PARTS[p][1]}{dot}-*-of-*.safetensors" for p in PARTS]
    fetch = f"hf download {repo_id} --include {' '.join(shlex.quote(p) for p in patterns)} --local-dir <dir>"

    def cut_short(what):
        return FileNotFoundError(
            f"the cached copy of '{repo_id}' {what}: a download cut short, or the repo has no such file"
            f"{f' (is there a {variant!r} variant?)' if variant else ''}. Run once with network access to complete "
            f"it, or on another machine run\n  {fetch}\ncopy <dir> here and pass its path as init_from.")
    try:
        path = snapshot_download(repo_id, allow_patterns=patterns)
    except getattr(errors, "IncompleteSnapshotError", ()):  # offline, some files cached (huggingface_hub 2)
        raise cut_short(f"in {HF_HUB_CACHE} lacks some of its files") from None
    except Exception as e:  # the Hub's answers, and the HTTP library's own errors (not OSError in httpx)
        why = "HF_HUB_OFFLINE is set" if HF_HUB_OFFLINE else "the Hub could not be reached, or the download failed"
        first_line = str(e).partition("\n")[0]
        raise RuntimeError(
            f"could not get '{repo_id}' from the Hugging Face Hub ({why}), and the cache {HF_HUB_CACHE} does not "
            f"hold all of it.\nFix: run once with network access, or on another machine run\n  {fetch}\n"
            f"copy <dir> here and pass its path as init_from.\n({type(e).__name__}: {first_line})") from e
    for p in pipeline_parts(read_json(os.path.join(path, "model_index.json"))):
        try:
            weight_files(path, p, variant)
        except FileNotFoundError:
            raise cut_short(f"({path}) has no {p}/{weights_name(p, variant)}") from None
    return path

def hub_file(repo_id, name):
    """Local path of one file of a Hub repo: the cached copy without asking the Hub (the repos used this way
    are fixed releases, so a cached file is never stale), else a download. Raises OSError saying why the
    file cannot be had, at once: when a file is not cached, hf_hub_download retries an unreachable Hub
    5 times (about 25 s), so one HEAD request, which huggingface_hub does not retry, goes first."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    path = try_to_load_from_cache(repo_id, name)
    if isinstance(path, str):  # None: not cached; another value: cached as absent from the repo
        return path
    if constants.HF_HUB_OFFLINE:
        raise OSError("HF_HUB_OFFLINE=1")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, name))
        return hf_hub_download(repo_id, name)
    except Exception as e:  # the HTTP library, and so its errors, differ between huggingface_hub versions
        first_line = str(e).partition("\n")[0]
        raise OSError(f"{type(e).__name__}: {first_line}") from None

def tower_hub_download(repo_id, weight_names):
    """Fetch an image tower's config.json and its weights (the first of weight_names the repo has; nothing
    else) through huggingface_hub's cache; returns the folder holding them."""
    def first(*names):  # the local path of the first of names that the cache or the Hub has
        why = []
        for name in names:
            try:
                return hub_file(repo_id, name)
            except OSError as e:
                why.append(f"{name}: {e}")
        raise RuntimeError(
            f"could not get {' or '.join(names)} of '{repo_id}': not in the Hugging Face cache, and fetching failed "
            f"({'; '.join(why)}).\n"
            f"Fix: run once with network access, or on another machine run\n"
            f"  hf download {repo_id} config.json {weight_names[0]} --local-dir DIR\n"
            f"copy DIR here and pass its path instead of '{repo_id}' (eval.py's clip_model, train.py's dino_model).")
    first("config.json")
    return os.path.dirname(first(*weight_names))  # the same snapshot folder

def tower_folder(cls, name_or_dir, repo, tiny_name, weight_names):
    """The local folder of an image tower (CLIP's, DINO's): name_or_dir itself, "tiny" (cls.tiny() built and
    saved on first use in the cache), or a Hub repo id (fetched, cached)."""
    if os.path.isdir(name_or_dir) and name_or_dir != "tiny":  # (a folder called tiny: pass it as ./tiny)
        return name_or_dir
    if name_or_dir == "tiny":
        path = tiny_path(tiny_name)
        if not os.path.exists(os.path.join(path, "config.json")):
            print(f"building the tiny random {cls.__name__} in {path}")
            cls.tiny().save_pretrained(path)
        return path
    if os.path.isfile(name_or_dir):
        raise FileNotFoundError(f"{name_or_dir!r} is one file: pass the folder that holds it and its config.json")
    if name_or_dir.count("/") == 1 and not name_or_dir.startswith((".", "/", "~")):
        return tower_hub_download(name_or_dir, weight_names)
    raise FileNotFoundError(f"{name_or_dir!r} is neither a folder nor a Hub repo id (owner/name, e.g. {repo}) nor 'tiny'")

@contextmanager
def on_meta():
    """Build modules on the meta device: no memory, no random init, for weights a file then replaces.
    nn.Embedding's init is skipped outright: normal_ on a meta tensor imports torch's compiler, a second."""
    reset = nn.Embedding.reset_parameters
    nn.Embedding.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            yield
    finally:
        nn.Embedding.reset_parameters = reset

def load_tower(cls, config_cls, part, folder, weight_names, device, dtype):
    """Build cls from folder/config.json on the meta device (no random init) and load the first of weight_names
    there strictly; a .bin is read with torch.load(weights_only=True): tensors and plain containers, never code."""
    config_file = os.path.join(folder, "config.json")
    weights = [os.path.join(folder, f) for f in weight_names if os.path.exists(os.path.join(folder, f))]
    if not os.path.exists(config_file) or not weights:
        missing = " or ".join(weight_names) if os.path.exists(config_file) else "config.json"
        raise FileNotFoundError(f"{folder} has no {missing}: a {cls.__name__} folder holds config.json and "
                                f"{' or '.join(weight_names)}")
    with on_meta():
        m = cls(config_from_dict(config_cls, read_json(config_file), part))
    sd = read_safetensors(weights[0])[0] if weights[0].endswith(".safetensors") else \
        torch.load(weights[0], map_location="cpu", weights_only=True)
    load_strict(m, fix_legacy_keys(part, sd), weights[0])
    return m.to(device=device, dtype=dtype).eval().requires_grad_(False)

def save_tower(module, path, meta):
    """config.json (meta + the dataclass config) and model.safetensors, as transformers writes a model folder."""
    os.makedirs(path, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
              os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:  # last: tower_folder takes a folder with it as built
        json.dump({**meta, **asdict(module.config)}, f, indent=2)

class FlopCounter(TorchDispatchMode):
    """The FLOPs of the ops run inside it, by torch's formulas (torch.utils.flop_counter's registry): the same
    count as torch's FlopCounterMode (a test compares them op by op), without its memory. FlopCounterMode runs
    every op that has a decomposition as the ops it decomposes into (silu's backward as several elementwise ops,
    each a new tensor; none of them has FLOPs to count), and tracks modules with backward hooks on their inputs
    and outputs. Counting live tensor bytes on the meta device (a phase-2 micro-step of SD1.5 at 512 px, one
    draw), the peak under it rose from 16.8 to 18.0 GiB, and with gradient checkpointing from 6.2 to 11.3 GiB;
    under this one it stays as without a counter."""

    def __init__(self):
        super().__init__()
        self.by_op = {}  # op -> FLOPs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            op = func._overloadpacket
            self.by_op[op] = self.by_op.get(op, 0) + formula(*args, **kwargs, out_val=out)
        return out

    def get_total_flops(self):
        return sum(self.by_op.values())

def count_flops():
    """A FlopCounter (matmuls, convolutions and attention, forward and backward; a context manager whose
    get_total_flops() is the count), with attention on the CPU counted as torch counts its GPU kernels: QK^T and
    PV forward, and in the backward the four matmuls of the gradients plus QK^T computed again."""
    for op, formula in ((torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                         lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v)),
                        (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
                         lambda grad, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(grad, q, k, v))):
        if op not in flop_registry:
            register_flop_formula(op)(formula)
    return FlopCounter()

def to_device(x, device):
    """A tensor made on the host (token ids, sizes, noise) onto `device`. On a GPU the copy starts from pinned memory
    without blocking: a plain .to() of host memory returns only once every kernel queued before it has finished,
    which leaves the GPU idle while the host prepares the next ones."""
    device = torch.device(device)
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)

@contextmanager
def seeded_init(seed):
    """nn.Module initialisers draw from the global generator: seed a forked copy of it (CPU only), so that the same
    seed builds the same weights and the caller's random state is left as it was (the tiny models)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield

def tiny_path(name="tiny-sd"):
    root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(root, "magicapture", name)

class StableDiffusion(nn.Module):
    """The pipeline: tokenizer, text encoder, VAE, UNet and noise schedule. SDXL adds tokenizer_2 and text_encoder_2
    (is_xl); everything else is the same classes, built from each part's config.json."""

    def __init__(self, tokenizer, text_encoder, vae, unet, schedule, tokenizer_2=None, text_encoder_2=None,
                 force_zeros_for_empty_prompt=True):
        super().__init__()
        self.tokenizer, self.schedule = tokenizer, schedule
        self.text_encoder, self.vae, self.unet = text_encoder, vae, unet
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        # SDXL's model_index.json setting (true in SDXL base 1.0): sample() gives an empty negative prompt zeros
        # as its context and pooled embedding instead of the encoded "", as SDXL's unconditional input was trained
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @property
    def is_xl(self):
        return self.text_encoder_2 is not None

    @classmethod
    def locate(cls, name_or_dir=DEFAULT_REPO, variant=None):
        """The local folder of a pipeline, as from_pretrained takes it: the folder itself, the tiny pipeline (built
        on first use), or the Hub repo's files (downloaded, or found in the cache); the errors say what to do."""
        tiny = {"tiny": ("tiny-sd", cls.tiny), "tiny-xl": ("tiny-sdxl", cls.tiny_xl)}
        if os.path.isdir(name_or_dir) and name_or_dir not in tiny:  # (a folder called tiny: pass it as ./tiny)
            path = name_or_dir
        elif name_or_dir in tiny:
            folder, build = tiny[name_or_dir]
            path = tiny_path(folder)
            if not os.path.exists(os.path.join(path, "model_index.json")):
                print(f"building the tiny random pipeline in {path}")
                build().save_pretrained(path)
        elif os.path.isfile(name_or_dir):
            raise FileNotFoundError(f"init_from={name_or_dir!r} is one file; this reads the diffusers folder layout. "
                                    "Convert a single-file checkpoint with diffusers: StableDiffusionPipeline"
                                    f".from_single_file({name_or_dir!r}).save_pretrained(folder), then pass folder")
        elif name_or_dir.count("/") == 1 and not name_or_dir.startswith((".", "/", "~")):
            path = hub_download(name_or_dir, variant)
        else:
            raise FileNotFoundError(f"init_from={name_or_dir!r} is neither a folder nor a Hub repo id (owner/name, "
                                    f"e.g. {DEFAULT_REPO} or {SDXL_REPO}) nor 'tiny' or 'tiny-xl'")
        return path

    @classmethod
    def from_pretrained(cls, name_or_dir=DEFAULT_REPO, device="cpu", dtype=torch.float32, variant=None):
        """
        Load a diffusers-layout pipeline (SD1.5, or SDXL where model_index.json lists text_encoder_2) from a local
        folder, a Hub repo id, or "tiny" / "tiny-xl" (a small random SD1.5 / SDXL pipeline built and saved on
        first use; runs anywhere). variant="fp16" picks the *.fp16.safetensors files (half the download).
        """
        path = cls.locate(name_or_dir, variant)
        index = read_json(os.path.join(path, "model_index.json"))
        names = pipeline_parts(index)
        configs = {p: read_json(os.path.join(path, p, PARTS[p][0])) for p in names}
        sched = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
        # build on the meta device (no random init of billions of parameters), then take the file's tensors
        with on_meta():
            parts = {p: PARTS[p][2](config_from_dict(PARTS[p][3], configs[p], p)) for p in names}
        xl = "text_encoder_2" in parts
        if (parts["unet"].config.addition_embed_type == "text_time") != xl:
            raise ValueError(f"{path}: unet/config.json has addition_embed_type="
                             f"{parts['unet'].config.addition_embed_type!r} but model_index.json lists "
                             f"{'a' if xl else 'no'} text_encoder_2; an SDXL folder has both, an SD1.x folder neither")
        if xl and not hasattr(parts["text_encoder_2"], "text_projection"):
            raise ValueError(f"{path}/text_encoder_2/config.json has architectures "
                             f"{list(parts['text_encoder_2'].config.architectures)}; SDXL's second text encoder is "
                             "a CLIPTextModelWithProjection (its pooled output conditions the UNet)")
        for p, module in parts.items():
            files = weight_files(path, p, variant)
            tensors = {k: v for f in files for k, v in read_safetensors(f)[0].items()}  # one file, or its shards
            load_strict(module, fix_legacy_keys(p, tensors), files[0])
            module.to(device=device, dtype=dtype).eval().requires_grad_(False)
        tokenizer = CLIPTokenizer.from_dir(os.path.join(path, "tokenizer"))
        # SDXL's tokenizer_2: the same vocabulary and merges, padded with "!" (its special_tokens_map.json)
        tokenizer_2 = CLIPTokenizer.from_dir(os.path.join(path, "tokenizer_2")) if xl else None
        schedule = Schedule(config_from_dict(ScheduleConfig, sched, "scheduler"))
        return cls(tokenizer, parts["text_encoder"], parts["vae"], parts["unet"], schedule, tokenizer_2,
                   parts.get("text_encoder_2"), index.get("force_zeros_for_empty_prompt", True))

    def save_pretrained(self, path):
        """Write the diffusers folder layout; diffusers' StableDiffusionPipeline (StableDiffusionXLPipeline for
        SDXL) .from_pretrained reads it. Placeholder tokens added to a tokenizer are left out, with their embedding
        rows: a training run saves those in its learned_embeds.safetensors, which load_textual_inversion and
        lora.load_result read."""
        towers = {"text_encoder": self.tokenizer, "text_encoder_2": self.tokenizer_2}  # each with its tokenizer
        meta = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL")}
        for p in ("text_encoder", "text_encoder_2"):
            if getattr(self, p) is not None:
                meta[p] = ("transformers", getattr(self, p).config.architectures[0])
        for p, (_, class_name) in meta.items():
            module = getattr(self, p)
            os.makedirs(os.path.join(path, p), exist_ok=True)
            cfg = {"_class_name": class_name, **asdict(module.config)}
            if p == "unet":
                cfg.update(act_fn="silu", flip_sin_to_cos=True, freq_shift=0, mid_block_type="UNetMidBlock2DCrossAttn",
                           downsample_padding=1)
            if p == "vae":
                n = len(module.config.block_out_channels)
                cfg.update(down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)
            tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
            lora = [k for k in tensors if ".lora_A." in k or ".lora_B." in k]
            if lora:  # diffusers would load the folder and ignore them: the base model, silently
                raise ValueError(f"the {p} has LoRA layers ({lora[0]}, ...): a pipeline folder holds plain weights; "
                                 "save the LoRA with lora.save_result instead")
            if p in towers:
                # special ids from the tokenizer: the SD1.5 and SDXL files' 0/2/1 are wrong for CLIP
                tok = towers[p]
                cfg.update(model_type="clip_text_model", bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                           pad_token_id=tok.pad_id, vocab_size=tok.base_size)
                key = "text_model.embeddings.token_embedding.weight"  # the base vocabulary's rows only (see above)
                tensors[key] = tensors[key][:tok.base_size].contiguous()
            with open(os.path.join(path, p, PARTS[p][0]), "w") as f:
                json.dump(cfg, f, indent=2)
            save_file(tensors, os.path.join(path, p, weights_name(p)))
        self.tokenizer.save(os.path.join(path, "tokenizer"))
        os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
        with open(os.path.join(path, "scheduler", "scheduler_config.json"), "w") as f:
            # the schedule's settings, less a timestep_spacing of None: the file it was read from gave none
            said = {k: v for k, v in asdict(self.schedule.config).items() if v is not None}
            json.dump({"_class_name": "DDIMScheduler", **said, "clip_sample": False, "prediction_type": "epsilon"},
                      f, indent=2)
        index = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
                 "safety_checker": [None, None], "feature_extractor": [None, None],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}
        if self.is_xl:
            self.tokenizer_2.save(os.path.join(path, "tokenizer_2"))
            index = {"_class_name": "StableDiffusionXLPipeline", "image_encoder": [None, None],
                     "feature_extractor": [None, None], "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
                     "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                     "scheduler": ["diffusers", "DDIMScheduler"]}
        index.update({p: list(m) for p, m in meta.items()})
        with open(os.path.join(path, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)

    @classmethod
    def tiny(cls, seed=0):
        """A small random pipeline with SD1.5's architecture (4 levels, 8x VAE) and a vocabulary built here.
        The same seed gives the same weights; the caller's global random state is left as it was."""
        tokenizer = tiny_tokenizer()
        with seeded_init(seed):
            text = CLIPTextModel(TextConfig(vocab_size=len(tokenizer.vocab), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2, projection_dim=32))
            vae = AutoencoderKL(VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1,
                                          norm_num_groups=8, sample_size=128))
            unet = UNet(UNetConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, attention_head_dim=2,
                                   cross_attention_dim=32, norm_num_groups=8, sample_size=16))
        return cls(tokenizer, text.eval().requires_grad_(False), vae.eval().requires_grad_(False),
                   unet.eval().requires_grad_(False), Schedule(ScheduleConfig()))

    @classmethod
    def tiny_xl(cls, seed=0):
        """A small random pipeline with SDXL's architecture: 3 levels, the top one without attention, then 1 and 2
        transformer blocks with linear projections; two text encoders (quick_gelu 32 wide, and gelu 48 wide with a
        40-wide projection), so the context is 32 + 48 = 80 wide and add_embedding reads 40 + 6 * 8 = 88; the
        tiny() VAE (8x) with SDXL's scaling factor. The same seed gives the same weights; the caller's global
        random state is left as it was."""
        tokenizer = tiny_tokenizer()
        tokenizer_2 = CLIPTokenizer(tokenizer.vocab, tokenizer.merges, pad_token="!")  # SDXL's tokenizer_2 pads with "!"
        with seeded_init(seed):
            text = CLIPTextModel(TextConfig(vocab_size=len(tokenizer.vocab), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2, projection_dim=32))
            text_2 = CLIPTextModel(TextConfig(vocab_size=len(tokenizer.vocab), hidden_size=48, intermediate_size=96,
                                              num_hidden_layers=2, num_attention_heads=2, projection_dim=40,
                                              hidden_act="gelu", architectures=("CLIPTextModelWithProjection",)))
            vae = AutoencoderKL(VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                                          sample_size=128, scaling_factor=0.13025))
            unet = UNet(UNetConfig(block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=(1, 2, 4),
                                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                   transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                                   cross_attention_dim=80, addition_embed_type="text_time", addition_time_embed_dim=8,
                                   projection_class_embeddings_input_dim=88, norm_num_groups=8, sample_size=16))
        for m in (text, text_2, vae, unet):
            m.eval().requires_grad_(False)
        schedule = Schedule(ScheduleConfig(timestep_spacing="leading"))  # as SDXL's scheduler_config.json
        return cls(tokenizer, text, vae, unet, schedule, tokenizer_2, text_2)

    def encode_prompts(self, prompts, original_size=None, crops_coords_top_left=(0, 0), target_size=None):
        """
        What the UNet is conditioned on. SD1.5: the context (B, 77, 768), the text encoder's last hidden state.
        SDXL: (context, added_cond), UNet.forward's last two arguments: context (B, 77, 2048) is both encoders'
        penultimate hidden states side by side (768 + 1280), added_cond is dict(text_embeds=(B, 1280), the second
        encoder's pooled projection, time_ids=(B, 6)). The sizes, (height, width) in pixels, are SDXL's
        micro-conditioning (SDXL paper, sec. 2.2), read by SDXL only: the image's size before it was resized, the
        top-left corner of its crop, and the size made; by default the native size and no crop, as diffusers sets them.
        """
        ids = to_device(self.tokenizer(prompts), self.device)
        if not self.is_xl:
            return self.text_encoder(ids)
        h_2, pooled = self.text_encoder_2.penultimate_and_pooled(to_device(self.tokenizer_2(prompts), self.device),
                                                                 self.tokenizer_2.eos_id)
        context = torch.cat([self.text_encoder.penultimate(ids), h_2], dim=-1)
        native = (self.vae.config.sample_size,) * 2
        # diffusers' add_time_ids order: original size, crop top-left, target size
        sizes = [*(original_size or native), *crops_coords_top_left, *(target_size or native)]
        time_ids = to_device(torch.tensor([sizes] * len(ids), dtype=torch.float32), self.device)
        return context, dict(text_embeds=pooled, time_ids=time_ids)

    @property
    def device(self):
        return self.unet.conv_in.weight.device

    @property
    def dtype(self):
        return self.unet.conv_in.weight.dtype

    @torch.no_grad()
    def sample(self, prompts, negative_prompt="", steps=50, guidance=7.5, eta=0.0, seed=None, latents=None,
               height=512, width=512, progress=False, sampler="ddim"):
        """Classifier-free guided sampling -> images (B, 3, H, W) in [0, 1]. sampler: "ddim" (eta: its
        noise) or "euler_a" (Euler ancestral, the official MagiCapture inference). seed: one for the batch, or a
        list of one per prompt (each image's noise then its own, the same in any batch). SDXL is conditioned on
        height x width as both its original and target size, without a crop."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        B = len(prompts)
        if height % 8 or width % 8:
            raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
        if isinstance(seed, (list, tuple)):
            generator = [torch.Generator(self.device).manual_seed(s) for s in seed]
        else:
            generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        if latents is None:
            shape = (B, self.vae.config.latent_channels, height // 8, width // 8)
            latents = noise_like(torch.empty(shape, device=self.device), generator)
        x = latents.to(self.device, self.dtype)
        negative = [negative_prompt] * B if isinstance(negative_prompt, str) else list(negative_prompt)
        # unconditional first: (2B, 77, D), and for SDXL its added_cond
        cond = self.encode_prompts(negative + prompts, original_size=(height, width), target_size=(height, width))
        context, added = cond if self.is_xl else (cond, None)
        if self.is_xl and self.force_zeros_for_empty_prompt:
            # an empty negative prompt is zeros (diffusers applies this when no negative prompt is given)
            keep = torch.tensor([n != "" for n in negative] + [True] * B, device=self.device).to(context.dtype)
            context = context * keep[:, None, None]
            added["text_embeds"] = added["text_embeds"] * keep[:, None]

        def guided(x_in, t):  # t as a tensor: a compiled UNet would compile again for each new Python number
            t = torch.full((2 * B,), t, device=self.device)
            eps_uncond, eps_text = self.unet(torch.cat([x_in, x_in]), t, context, added).chunk(2)
            return eps_uncond + guidance * (eps_text - eps_uncond)  # classifier-free guidance

        schedule = self.schedule
        if sampler == "ddim":
            timesteps = schedule.ddim_timesteps(steps)
            ratio = schedule.config.num_train_timesteps // steps

            def step(i, t, x):
                return schedule.ddim_step(x, guided(x, t), t, t - ratio, eta, generator)
        elif sampler == "euler_a":
            timesteps, sigmas, start = schedule.euler_sigmas(steps)
            x = x * start

            def step(i, t, x):  # the UNet sees x scaled back to unit variance: z_t = x / sqrt(sigma^2 + 1)
                eps = guided(x / (sigmas[i] ** 2 + 1) ** 0.5, t)
                return schedule.euler_ancestral_step(x, eps, sigmas[i], sigmas[i + 1], generator)
        else:
            raise ValueError(f"sampler must be 'ddim' or 'euler_a', got {sampler!r}")
        bar = timesteps
        if progress:
            from tqdm import tqdm
            bar = tqdm(timesteps, desc=sampler, unit="step")
        for i, t in enumerate(bar):
            x = step(i, t, x)
        vae = self.vae
        # SDXL's VAE overflows in fp16 (force_upcast in its config.json): decode in fp32, as diffusers' SDXL pipeline
        upcast = self.is_xl and vae.config.force_upcast and vae.post_quant_conv.weight.dtype == torch.float16
        if upcast:
            vae.float()
        try:
            images = vae.decode((x / vae.config.scaling_factor).to(vae.post_quant_conv.weight.dtype))
        finally:
            if upcast:
                vae.half()
        return (images.float() / 2 + 0.5).clamp(0, 1)

def tiny_tokenizer():
    """A CLIP-style byte-level BPE vocabulary built here: the 512 byte symbols, merges that spell
    common prompt words whole, and the two special tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins for bytes, GPT-2 style
    alphabet.sort()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(alphabet)})
    words = ("a an the of in on at with and by photo painting portrait picture style person man woman face "
             "smiling wearing wedding passport studio light dark red blue green black white old young "
             "beautiful oil watercolor sketch drawing cinematic close up background hair eyes astronaut").split()
    merges, ranks = [], {}

    def bpe(symbols):  # the BPE rule: repeatedly merge the adjacent pair with the lowest rank
        while len(symbols) > 1:
            pairs = [(ranks.get(p, math.inf), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
            rank, i = min(pairs)
            if rank == math.inf:
                break
            symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
        return symbols

    for w in words:  # add merges until each word is one token under the merges before it
        symbols = bpe(list(w[:-1]) + [w[-1] + "</w>"])
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab[pair[0] + pair[1]] = len(vocab)
            symbols = bpe(symbols)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab, merges)
