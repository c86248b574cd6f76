"""
LoRA injection, scaling, merging and files (lora.py), on small stand-in
modules with the SD1.5 attribute paths; a training run's outputs saved and
loaded on the tiny pipeline; plus one interop check against diffusers + peft
loading our files into their own UNet and CLIP text encoder. SDXL: the same outputs for a tiny
SDXL-shaped diffusers UNet and two text encoders, loaded by diffusers' StableDiffusionXLPipeline.
Run: python -m pytest -q tests/test_lora.py
"""

import json
import os
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora
from model import CLIPTextModel, StableDiffusion, TextConfig, tiny_tokenizer

D, CTX = 8, 6  # model width and text width of the stand-ins


class Attn(nn.Module):
    """Attention with the diffusers names; to_out is a one-item ModuleList as in the checkpoint."""

    def __init__(self, ctx):
        super().__init__()
        self.to_q = nn.Linear(D, D, bias=False)
        self.to_k = nn.Linear(ctx, D, bias=False)
        self.to_v = nn.Linear(ctx, D, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(D, D)])

    def forward(self, x, c):
        return self.to_out[0](F.scaled_dot_product_attention(self.to_q(x), self.to_k(c), self.to_v(c)))


class Block(nn.Module):
    """Transformer block: attn1 (self), attn2 (cross), ff.net.0.proj / ff.net.2 (index 1 is a placeholder)."""

    def __init__(self):
        super().__init__()
        self.attn1, self.attn2 = Attn(D), Attn(CTX)
        geglu = nn.ModuleDict(dict(proj=nn.Linear(D, 4 * D)))
        self.ff = nn.ModuleDict(dict(net=nn.ModuleList([geglu, nn.Identity(), nn.Linear(2 * D, D)])))

    def forward(self, x, c):
        x = x + self.attn1(x, x)
        x = x + self.attn2(x, c)
        h, gate = self.ff.net[0].proj(x).chunk(2, dim=-1)
        return x + self.ff.net[2](h * F.gelu(gate))


class TinyUNet(nn.Module):
    """down_blocks.N.attentions.0.transformer_blocks.0.*, plus a Linear that no pattern targets."""

    def __init__(self):
        super().__init__()
        self.time_embedding = nn.ModuleDict(dict(linear_1=nn.Linear(D, D)))
        attn = lambda: nn.ModuleDict(dict(transformer_blocks=nn.ModuleList([Block()])))  # noqa: E731
        self.down_blocks = nn.ModuleList(
            [nn.ModuleDict(dict(attentions=nn.ModuleList([attn()]))) for _ in range(2)]
        )

    def forward(self, x, c):
        x = x + self.time_embedding.linear_1(x)
        for b in self.down_blocks:
            x = b.attentions[0].transformer_blocks[0](x, c)
        return x


class TinyTextEncoder(nn.Module):
    """text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj, as in the transformers CLIP checkpoint."""

    def __init__(self):
        super().__init__()
        layer = lambda: nn.ModuleDict(  # noqa: E731
            dict(self_attn=nn.ModuleDict({n: nn.Linear(CTX, CTX) for n in ("q_proj", "k_proj", "v_proj", "out_proj")}))
        )
        enc = nn.ModuleDict(dict(layers=nn.ModuleList([layer() for _ in range(2)])))
        self.text_model = nn.ModuleDict(dict(encoder=enc))

    def forward(self, c):
        for layer in self.text_model.encoder.layers:
            a = layer.self_attn
            c = c + a.out_proj(F.scaled_dot_product_attention(a.q_proj(c), a.k_proj(c), a.v_proj(c)))
        return c


def make_models(seed=0):
    """Stand-in UNet and text encoder with fixed random weights, and fixed inputs."""
    torch.manual_seed(seed)
    unet, te = TinyUNet(), TinyTextEncoder()
    x, c = torch.randn(2, 5, D), torch.randn(2, 3, CTX)
    return unet, te, x, c


def run(unet, te, x, c):
    with torch.no_grad():
        return unet(x, te(c))


def randomise_b(*models):
    """Give every lora_B random values, so the update is not zero."""
    g = torch.Generator().manual_seed(1)
    for model in models:
        for _, m in lora.lora_modules(model):
            with torch.no_grad():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def maxdiff(a, b):
    return (a - b).abs().max().item()


def test_zero_init_gives_base_output_exactly():
    """Freshly injected LoRA (lora_B = 0) leaves the output bit-for-bit unchanged."""
    unet, te, x, c = make_models()
    base = run(unet, te, x, c)
    lora.inject(unet, lora.OFFICIAL_UNET)
    lora.inject(te, lora.OFFICIAL_TEXT_ENCODER)
    out = run(unet, te, x, c)
    assert torch.equal(out, base), f"max abs diff {maxdiff(out, base)}"


def test_init_follows_official_code():
    """lora_B starts at zero and lora_A ~ N(0, std 1/rank), as in the official code."""
    unet, *_ = make_models()
    lora.inject(unet, [r".*ff\.net\.0\.proj"], rank=4, generator=torch.Generator().manual_seed(5))
    _, m = lora.lora_modules(unet)[0]
    assert m.lora_B.weight.abs().max() == 0
    want = torch.empty(m.lora_A.weight.shape).normal_(0, 1 / 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(m.lora_A.weight, want)  # the generator's first draw: normal, std 1 / rank


def test_init_from_a_local_generator():
    """inject(generator=...) draws lora_A from that generator alone: the same seed gives the same init,
    and the global RNG is neither read nor advanced."""
    inits = []
    for global_seed in (1, 2):
        unet, *_ = make_models()
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        lora.inject(unet, lora.PAPER_UNET, generator=torch.Generator().manual_seed(5))
        assert torch.equal(torch.get_rng_state(), state), "inject advanced the global RNG"
        inits.append(torch.cat([m.lora_A.weight.flatten() for _, m in lora.lora_modules(unet)]))
    assert torch.equal(*inits), f"max abs diff {maxdiff(*inits)} between two inits from the same generator seed"
    unet, *_ = make_models()
    lora.inject(unet, lora.PAPER_UNET, generator=torch.Generator().manual_seed(6))
    other = torch.cat([m.lora_A.weight.flatten() for _, m in lora.lora_modules(unet)])
    assert maxdiff(other, inits[0]) > 0.1, "another generator seed gave the same init"


def test_inject_keeps_base_keys_and_parameters():
    """Base state_dict keys and Parameter objects stay; only lora_A/lora_B keys are added."""
    unet, *_ = make_models()
    before = dict(unet.named_parameters())
    names = lora.inject(unet, lora.OFFICIAL_UNET)
    after = unet.state_dict()
    added = {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    missing = set(before) - set(after)
    assert not missing, f"base keys lost: {sorted(missing)}"
    assert set(after) - set(before) == added, f"unexpected keys: {sorted(set(after) - set(before) - added)}"
    params = dict(unet.named_parameters())
    moved = [k for k in before if params[k] is not before[k]]
    assert not moved, f"base parameters replaced: {moved}"


def test_patterns_pick_the_right_layers():
    """The paper's patterns pick 4 cross-attention projections per block; the official ones 9 + text q/k/v/out."""
    unet, te, _, _ = make_models()
    paper = lora.inject(unet, lora.PAPER_UNET)
    assert len(paper) == 2 * 4 and all(".attn2." in n for n in paper), paper
    unet, te, _, _ = make_models()
    official = lora.inject(unet, lora.OFFICIAL_UNET)
    assert len(official) == 2 * 9 and not any("time_embedding" in n or "net.2" in n for n in official), official
    text = lora.inject(te, lora.OFFICIAL_TEXT_ENCODER)
    assert len(text) == 2 * 4, text


def test_pattern_matching_nothing_raises():
    """A pattern that matches no nn.Linear is an error, not a silent no-op."""
    unet, *_ = make_models()
    with pytest.raises(ValueError, match="matches"):
        lora.inject(unet, [r".*attn3\.to_q"])


def test_double_inject_raises():
    """Injecting twice into the same layer is an error (it would stack two updates)."""
    unet, *_ = make_models()
    lora.inject(unet, lora.PAPER_UNET)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.inject(unet, lora.PAPER_UNET)


def test_forward_is_w_plus_scaled_ba():
    """LoRALinear computes x (W + scale * alpha/rank * B A)^T + b."""
    unet, *_ = make_models()
    lora.inject(unet, [r".*attn1\.to_out\.0"], rank=2, alpha=3)
    randomise_b(unet)
    lora.set_scale(unet, 0.6)
    m = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_out[0]
    x = torch.randn(4, D)
    w = m.weight + 0.6 * (3 / 2) * m.lora_B.weight @ m.lora_A.weight
    with torch.no_grad():
        d = maxdiff(m(x), F.linear(x, w, m.bias))
    assert d < 1e-6, f"max abs diff {d}"


def test_scale_zero_gives_base_output():
    """set_scale(0) turns a trained LoRA off exactly; scale 1 changes the output."""
    unet, te, x, c = make_models()
    base = run(unet, te, x, c)
    lora.inject(unet, lora.OFFICIAL_UNET)
    randomise_b(unet)
    assert maxdiff(run(unet, te, x, c), base) > 1e-3, "randomised LoRA did not change the output"
    lora.set_scale(unet, 0.0)
    out = run(unet, te, x, c)
    assert torch.equal(out, base), f"max abs diff {maxdiff(out, base)}"


def test_merge_equals_unmerged():
    """Merged forward equals the unmerged one at the scale set before merging; the scale is then fixed."""
    unet, te, x, c = make_models()
    lora.inject(unet, lora.OFFICIAL_UNET, rank=4, alpha=8)
    randomise_b(unet)
    lora.set_scale(unet, 0.6)
    ref = run(unet, te, x, c)
    lora.merge(unet)
    d = maxdiff(run(unet, te, x, c), ref)
    assert d < 1e-6, f"merged vs unmerged max abs diff {d}"
    with pytest.raises(RuntimeError, match="set the scale before merge"):
        lora.set_scale(unet, 1.0)


def tiny_with_lora(text_encoder=True):
    """The tiny pipeline with random LoRA (rank 4, alpha 2) on the UNet's cross-attention and,
    if asked, the text encoder's attention."""
    sd = StableDiffusion.tiny()
    g = torch.Generator().manual_seed(0)
    lora.inject(sd.unet, lora.PAPER_UNET, rank=4, alpha=2, generator=g)
    if text_encoder:
        lora.inject(sd.text_encoder, lora.OFFICIAL_TEXT_ENCODER, rank=4, alpha=2, generator=g)
    randomise_b(sd.unet, sd.text_encoder)
    return sd


def draw(sd, prompt="a photo of <v1> person"):
    return sd.sample([prompt], steps=2, height=64, width=64, seed=0)


def test_merged_sampling_equals_unmerged():
    """What sample.py does: a whole DDIM sample of the tiny pipeline with merged LoRA (UNet 0.6, text
    encoder 0.9, set before merging) equals the unmerged one; scale 0 merged gives the base model."""
    base = draw(StableDiffusion.tiny(), "a photo")
    sd = tiny_with_lora()
    lora.set_scale(sd.unet, 0.6)
    lora.set_scale(sd.text_encoder, 0.9)
    ref = draw(sd, "a photo")
    assert maxdiff(ref, base) > 1e-2, f"the LoRA changes the image by only {maxdiff(ref, base)}"
    lora.merge(sd.unet, sd.text_encoder)
    d = maxdiff(draw(sd, "a photo"), ref)
    assert d < 1e-4, f"merged vs unmerged sample: max abs diff {d} (pixels in [0, 1])"
    sd = tiny_with_lora()
    lora.set_scale(sd.unet, 0.0)
    lora.set_scale(sd.text_encoder, 0.0)
    lora.merge(sd.unet, sd.text_encoder)
    d = maxdiff(draw(sd, "a photo"), base)
    assert d < 1e-5, f"scale 0 merged vs base: max abs diff {d}"


def test_save_load_round_trip(tmp_path):
    """save_lora_file then load_lora_file into fresh models gives the same outputs and metadata."""
    unet, te, x, c = make_models()
    lora.inject(unet, lora.OFFICIAL_UNET, rank=4, alpha=6)
    lora.inject(te, lora.OFFICIAL_TEXT_ENCODER, rank=2, alpha=1)
    randomise_b(unet, te)
    lora.set_scale(unet, 0.7)
    lora.set_scale(te, 0.7)
    ref = run(unet, te, x, c)
    path = tmp_path / lora.LORA_FILE
    lora.save_lora_file(unet, te, path, metadata={"rank": "4", "steps": "1500"})
    with safe_open(path, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_B.weight" in keys
    assert meta == {"rank": "4", "steps": "1500"}, meta
    unet2, te2, _, _ = make_models()  # same seed: same base weights, no LoRA
    lora.load_lora_file(unet2, te2, path, scale=0.7)
    out = run(unet2, te2, x, c)
    assert maxdiff(out, ref) < 1e-6, f"max abs diff {maxdiff(out, ref)}"
    # the text encoder's keys as diffusers writes them from transformers 5's CLIPTextModel: without text_model
    save_file({k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in load_file(str(path)).items()},
              str(path))
    unet2, te2, _, _ = make_models()
    lora.load_lora_file(unet2, te2, path, scale=0.7)
    assert maxdiff(run(unet2, te2, x, c), ref) < 1e-6


def test_load_rejects_wrong_rank(tmp_path):
    """Loading into a layer that already has LoRA of another rank names the layer and both shapes."""
    unet, te, _, _ = make_models()
    lora.inject(unet, lora.PAPER_UNET, rank=4)
    path = tmp_path / lora.LORA_FILE
    lora.save_lora_file(unet, None, path)
    unet2, _, _, _ = make_models()
    lora.inject(unet2, lora.PAPER_UNET, rank=2)
    with pytest.raises(ValueError, match="attn2"):
        lora.load_lora_file(unet2, None, path)


def test_kohya_export_keys_and_alpha(tmp_path):
    """The kohya file has lora_unet_/lora_te_ keys with down/up/alpha, the real alpha, and ss_ metadata."""
    unet, te, _, _ = make_models()
    names = lora.inject(unet, lora.PAPER_UNET, rank=4, alpha=2)
    text = lora.inject(te, lora.OFFICIAL_TEXT_ENCODER, rank=4, alpha=2)
    randomise_b(unet, te)
    path = tmp_path / "kohya.safetensors"
    lora.export_kohya(unet, te, path, metadata={"network_dim": "4", "ss_steps": "10"})
    with safe_open(path, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    stems = [f"lora_unet_{n.replace('.', '_')}" for n in names] + [f"lora_te_{n.replace('.', '_')}" for n in text]
    expected = {f"{s}.{part}" for s in stems for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(sd) == expected, f"missing {sorted(expected - set(sd))[:3]}, extra {sorted(set(sd) - expected)[:3]}"
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in sd
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0"
    m = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_out[0]
    assert sd[f"{key}.alpha"].shape == () and sd[f"{key}.alpha"].item() == 2.0, sd[f"{key}.alpha"]
    assert torch.equal(sd[f"{key}.lora_down.weight"], m.lora_A.weight.detach())
    assert torch.equal(sd[f"{key}.lora_up.weight"], m.lora_B.weight.detach())
    assert meta == {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_steps": "10"}, meta
    # load_lora_file reads diffusers' naming; this one, and diffusers' old attention-processor files, are named
    old = tmp_path / "old.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight":
               torch.zeros(4, 32)}, str(old))
    for file, naming in ((path, "kohya's naming"), (old, "old attention-processor naming")):
        with pytest.raises(ValueError, match=naming):
            lora.load_lora_file(*make_models()[:2], file)


def test_diffusers_loads_our_files(tmp_path):
    """diffusers + peft load our PEFT and kohya files into their own UNet and CLIP text encoder with equal outputs."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg = dict(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
        attention_head_dim=2, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    te_cfg = CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=98, eos_token_id=99, pad_token_id=1,
    )  # fmt: skip

    def fresh():
        torch.manual_seed(0)
        return diffusers.UNet2DConditionModel(**unet_cfg).eval(), CLIPTextModel(te_cfg).eval()

    ids, x, t = torch.tensor([[98, 5, 7, 9, 99]]), torch.randn(1, 4, 8, 8), torch.tensor([10])

    def generate(unet, te):
        with torch.no_grad():
            return unet(x, t, te(ids).last_hidden_state).sample

    class Pipe(StableDiffusionLoraLoaderMixin):
        """The least a diffusers pipeline needs for load_lora_weights."""

        def __init__(self, unet, text_encoder):
            self.unet, self.text_encoder, self.hf_device_map = unet, text_encoder, None
            self.components = dict(unet=unet, text_encoder=text_encoder)

    unet, te = fresh()
    base = generate(unet, te)
    # transformers 5 drops CLIPTextModel's text_model level; our model keeps it, as the checkpoint does
    ours_te = nn.Module()
    ours_te.text_model = te
    lora.inject(unet, lora.OFFICIAL_UNET, rank=4, alpha=8)
    lora.inject(ours_te, lora.OFFICIAL_TEXT_ENCODER, rank=4, alpha=2)
    randomise_b(unet, ours_te)
    ref = generate(unet, te)
    assert maxdiff(ref, base) > 1e-2, "randomised LoRA did not change the output"

    lora.save_lora_file(unet, ours_te, tmp_path / lora.LORA_FILE, metadata={"steps": "1"})
    lora.export_kohya(unet, ours_te, tmp_path / "kohya.safetensors")
    for fmt, source in (("peft", tmp_path), ("kohya", tmp_path / "kohya.safetensors")):
        pipe = Pipe(*fresh())
        pipe.load_lora_weights(source)
        out = generate(pipe.unet, pipe.text_encoder)
        d = maxdiff(out, ref)
        assert d < 1e-5, f"{fmt}: diffusers output differs by {d} (LoRA effect {maxdiff(ref, base)})"


# -----------------------------------------------------------------------------
# a training run's outputs: save_result / load_result

META = {"init_from": '"tiny"', "seed": "0"}


def save_run(out, text_encoder=True):
    """A tiny run saved with save_result: random LoRA and two learned tokens. Returns the trained sd and
    the embeddings."""
    sd = tiny_with_lora(text_encoder)
    width = sd.text_encoder.text_model.embeddings.token_embedding.embedding_dim
    embeds = {"<v1>": torch.randn(width), "<v2>": torch.randn(width)}
    lora.save_result(str(out), sd.unet, sd.text_encoder if text_encoder else None, embeds, META)
    return sd, embeds


@pytest.mark.parametrize("target", ["", lora.LORA_FILE, lora.EMBEDS_FILE])
def test_load_result_round_trip(tmp_path, target):
    """load_result of the folder, or of either file, into a fresh tiny pipeline gives the saved tokens and
    embeddings and the same image as the model that was saved, at the given UNet and text encoder scales."""
    trained, embeds = save_run(tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run")) == sorted([lora.EMBEDS_DIR, lora.EMBEDS_FILE, lora.LORA_FILE,
                                                           lora.KOHYA_FILE])
    for i, token in enumerate(embeds):  # one file per token, named without <>, holding (1, width) under the token
        per_token = load_file(tmp_path / "run" / lora.EMBEDS_DIR / f"v{i + 1}.safetensors")
        assert list(per_token) == [token] and torch.equal(per_token[token], embeds[token][None]), token
    sd = StableDiffusion.tiny()
    tokens = lora.load_result(sd, str(tmp_path / "run" / target), scale=0.6, text_scale=0.9)
    assert tokens == ["<v1>", "<v2>"]
    table = sd.text_encoder.text_model.embeddings.token_embedding.weight
    for token in tokens:
        assert torch.equal(table[sd.tokenizer.tok.token_to_id(token)], embeds[token]), token
    # the trained model, with the same tokens and scales
    assert trained.tokenizer.add_tokens(tokens) == [sd.tokenizer.tok.token_to_id(t) for t in tokens]
    trained.text_encoder.resize_token_embeddings(len(trained.tokenizer))
    with torch.no_grad():
        for token in tokens:
            trained.text_encoder.text_model.embeddings.token_embedding.weight[
                trained.tokenizer.tok.token_to_id(token)] = embeds[token]
    lora.set_scale(trained.unet, 0.6)
    lora.set_scale(trained.text_encoder, 0.9)
    d = maxdiff(draw(sd), draw(trained))
    assert d < 1e-5, f"loaded vs saved model: max abs diff {d}"


def test_save_result_headers(tmp_path):
    """Every file carries the run's metadata; the kohya header takes network_dim and network_alpha from
    the LoRA modules (rank 4, alpha 2)."""
    save_run(tmp_path)
    for name in (lora.EMBEDS_FILE, lora.LORA_FILE):
        with safe_open(tmp_path / name, "pt") as f:
            assert f.metadata() == META, (name, f.metadata())
    with safe_open(tmp_path / lora.KOHYA_FILE, "pt") as f:
        meta = f.metadata()
    assert meta == {"ss_network_module": "networks.lora", "ss_init_from": '"tiny"', "ss_seed": "0",
                    "ss_network_dim": "4", "ss_network_alpha": "2"}, meta


def test_embeddings_only_run(tmp_path):
    """A run without LoRA (phase 2 of 0 steps) saves only its embeddings, removes LoRA files an earlier
    run left in the folder, and loads its tokens into a model that stays without LoRA."""
    save_run(tmp_path)  # an earlier run with LoRA in the same folder
    sd = StableDiffusion.tiny()
    embeds = {"<v1>": torch.randn(32), "<v2>": torch.randn(32)}
    lora.save_result(str(tmp_path), sd.unet, None, embeds, META)
    assert sorted(os.listdir(tmp_path)) == [lora.EMBEDS_DIR, lora.EMBEDS_FILE]
    sd = StableDiffusion.tiny()
    assert lora.load_result(sd, str(tmp_path / lora.EMBEDS_FILE), scale=0.6, text_scale=0.9) == ["<v1>", "<v2>"]
    assert not lora.lora_modules(sd.unet) and not lora.lora_modules(sd.text_encoder)


def test_load_result_errors(tmp_path):
    """A missing path, a folder without the embeddings, and a file that is neither of the two each raise
    an error naming the path and what is expected."""
    save_run(tmp_path / "run", text_encoder=False)
    shutil.copy(tmp_path / "run" / lora.LORA_FILE, tmp_path / lora.LORA_FILE)  # a LoRA file without its embeddings
    cases = [(FileNotFoundError, tmp_path / "nowhere", "nowhere: no such folder or file; expected a training run"),
             (FileNotFoundError, tmp_path / "run" / "nowhere" / lora.LORA_FILE, "no such folder or file"),
             (FileNotFoundError, tmp_path, f"{tmp_path} has no {lora.EMBEDS_FILE}"),
             (FileNotFoundError, tmp_path / lora.LORA_FILE, f"{tmp_path} has no {lora.EMBEDS_FILE}"),
             (ValueError, tmp_path / "run" / lora.KOHYA_FILE, "is not a training result; expected")]
    for error, path, message in cases:
        with pytest.raises(error) as e:
            lora.load_result(StableDiffusion.tiny(), str(path))
        assert message in str(e.value) and lora.EMBEDS_FILE in str(e.value), str(e.value)


def test_diffusers_lora_file_with_alpha_in_its_header(tmp_path):
    """A LoRA file diffusers wrote from a peft adapter with lora_alpha != r (and an alpha_pattern) records that in
    its header, with B unscaled: loaded, it gives the adapter's own update, not one at alpha = r."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    sd = StableDiffusion.tiny()
    lora.inject(sd.unet, lora.PAPER_UNET, rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
    randomise_b(sd.unet)
    for name, m in lora.lora_modules(sd.unet):
        m.alpha = 2 if name.endswith("to_k") else 8
    layers = {f"{n}.lora_{ab}.weight": getattr(m, f"lora_{ab}").weight.detach().clone()  # B as peft keeps it
              for n, m in lora.lora_modules(sd.unet) for ab in "AB"}
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(tmp_path), unet_lora_layers=layers,
        unet_lora_adapter_metadata=dict(r=4, lora_alpha=8, alpha_pattern={"attn2.to_k": 2}))
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, sd.unet.config.cross_attention_dim)
    with torch.no_grad():
        want = sd.unet(x, t, c)
        fresh = StableDiffusion.tiny()
        base = fresh.unet(x, t, c)
        lora.load_lora_file(fresh.unet, None, str(tmp_path / lora.LORA_FILE))
        got = fresh.unet(x, t, c)
    assert maxdiff(want, base) > 1e-3 and maxdiff(got, want) < 1e-5, (maxdiff(got, want), maxdiff(want, base))


def test_a_pipeline_with_lora_is_not_saved(tmp_path):
    """save_pretrained refuses a model with LoRA layers: diffusers would load the folder as the base model."""
    with pytest.raises(ValueError, match="has LoRA layers"):
        tiny_with_lora(text_encoder=False).save_pretrained(str(tmp_path / "p"))


def test_load_result_reads_diffusers_token_rows_and_names_bad_files(tmp_path):
    """Token vectors saved (1, width), as diffusers' textual inversion saves them, load; a LoRA key for a module
    the model lacks, and a file cut short, are named."""
    save_run(tmp_path / "run", text_encoder=False)
    rows = load_file(str(tmp_path / "run" / lora.EMBEDS_FILE))
    save_file({t: v[None] for t, v in rows.items()}, str(tmp_path / "run" / lora.EMBEDS_FILE))
    sd = StableDiffusion.tiny()
    assert lora.load_result(sd, str(tmp_path / "run")) == ["<v1>", "<v2>"]
    table = sd.text_encoder.text_model.embeddings.token_embedding.weight
    assert torch.equal(table[-2], rows["<v1>"]) and torch.equal(table[-1], rows["<v2>"])
    f = str(tmp_path / "run" / lora.LORA_FILE)
    sd_file = load_file(f)
    save_file({k.replace("down_blocks.1", "down_blocks.9"): v for k, v in sd_file.items()}, f)
    with pytest.raises(ValueError, match="names down_blocks.9.*which the unet has not"):
        lora.load_result(StableDiffusion.tiny(), str(tmp_path / "run"))
    data = open(f, "rb").read()
    open(f, "wb").write(data[:len(data) // 2])
    with pytest.raises(ValueError, match="is not a readable .safetensors file"):
        lora.load_result(StableDiffusion.tiny(), str(tmp_path / "run"))


def test_load_lora_file_leaves_global_rng(tmp_path):
    """Loading a LoRA file injects the layers it names without drawing from the global RNG."""
    unet, *_ = make_models()
    lora.inject(unet, lora.PAPER_UNET)
    lora.save_lora_file(unet, None, tmp_path / lora.LORA_FILE)
    unet2, _, _, _ = make_models()
    state = torch.get_rng_state()
    lora.load_lora_file(unet2, None, tmp_path / lora.LORA_FILE)
    assert torch.equal(torch.get_rng_state(), state), "load_lora_file advanced the global RNG"


# -----------------------------------------------------------------------------
# SDXL: two text encoders, and kohya's SGM names for the UNet

def test_kohya_sdxl_unet_name():
    """diffusers' SDXL UNet paths map to the SGM paths of sd-scripts' make_unet_conversion_map (resnet Linear:
    emb_layers.1), and a path outside SDXL's layout is an error naming it."""
    cases = {
        "down_blocks.0.resnets.1.time_emb_proj": "input_blocks.2.0.emb_layers.1",
        "down_blocks.1.attentions.1.proj_out": "input_blocks.5.1.proj_out",
        "down_blocks.2.attentions.1.proj_in": "input_blocks.8.1.proj_in",
        "mid_block.resnets.0.time_emb_proj": "middle_block.0.emb_layers.1",
        "mid_block.attentions.0.transformer_blocks.9.ff.net.2": "middle_block.1.transformer_blocks.9.ff.net.2",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.attentions.2.transformer_blocks.1.attn1.to_q": "output_blocks.2.1.transformer_blocks.1.attn1.to_q",
        "up_blocks.1.resnets.0.time_emb_proj": "output_blocks.3.0.emb_layers.1",
        "up_blocks.2.resnets.2.time_emb_proj": "output_blocks.8.0.emb_layers.1",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
    }  # fmt: skip
    got = {name: lora.kohya_sdxl_unet_name(name) for name in cases}
    assert got == cases, {k: v for k, v in got.items() if v != cases[k]}
    for name in ("down_blocks.3.resnets.0.time_emb_proj", "down_blocks.0.resnets.2.time_emb_proj", "conv_in"):
        with pytest.raises(ValueError, match=re.escape(name)):
            lora.kohya_sdxl_unet_name(name)


def sdxl_unet(seed=0):
    """diffusers' UNet2DConditionModel in SDXL's layout, tiny: 3 levels (no attention in the first), 2 layers
    down and 3 up, linear projections, text_time added conditioning; context = 32 + 48 wide."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        cross_attention_dim=32 + 48, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    """A tiny SDXL run saved with save_result: LoRA on every Linear of the UNet (rank 4, alpha 3), the first
    text encoder's attention and fc1 (rank 2, alpha 1), the second's attention (rank 3, alpha 5), and two
    tokens. The text encoders are transformers' CLIPTextModel and CLIPTextModelWithProjection."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = tmp_path_factory.mktemp("sdxl")
    tiny_tokenizer().save(folder / "tokenizer")
    vocab = len(CLIPTokenizer.from_pretrained(folder / "tokenizer"))
    cfg = dict(vocab_size=vocab, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

    def fresh():
        unet = sdxl_unet()
        torch.manual_seed(1)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=32, **cfg)).eval()
        te_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, projection_dim=16, **cfg)).eval()
        return unet, te, te_2

    def pipe():
        """diffusers' SDXL pipeline of the same base weights and a fresh tokenizer per encoder."""
        import diffusers

        unet, te, te_2 = fresh()
        tok, tok_2 = (CLIPTokenizer.from_pretrained(folder / "tokenizer") for _ in range(2))
        return diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=te, text_encoder_2=te_2, tokenizer=tok,
                                                   tokenizer_2=tok_2, unet=unet, scheduler=None)

    unet, te, te_2 = fresh()
    # transformers 5 drops CLIPTextModel's text_model level; our model keeps it, as the checkpoint does
    ours_te = nn.Module()
    ours_te.text_model = te
    lora.inject(unet, [r".*"], rank=4, alpha=3)
    lora.inject(ours_te, lora.OFFICIAL_TEXT_ENCODER + (r".*mlp\.fc1",), rank=2, alpha=1)
    lora.inject(te_2, lora.OFFICIAL_TEXT_ENCODER, rank=3, alpha=5)
    randomise_b(unet, ours_te, te_2)
    g = torch.Generator().manual_seed(2)
    embeds = {t: (torch.randn(32, generator=g), torch.randn(48, generator=g)) for t in ("<v1>", "<v2>")}
    out = folder / "run"
    lora.save_result(str(out), unet, ours_te, embeds, META, text_encoder_2=te_2)
    models = {"unet": unet, "text_encoder": ours_te, "text_encoder_2": te_2}
    return SimpleNamespace(out=out, models=models, embeds=embeds, pipe=pipe)


def test_sdxl_result_files(sdxl_run):
    """An SDXL run's folder: the embeddings (clip_l/clip_g rows and the header's token list), one A1111/ComfyUI
    file per token, and a kohya file with SGM UNet names, lora_te1_/lora_te2_ and SDXL's base-model tag."""
    out = sdxl_run.out
    assert sorted(os.listdir(out)) == sorted([lora.EMBEDS_DIR, lora.EMBEDS_FILE, lora.KOHYA_FILE, lora.LORA_FILE])
    assert sorted(os.listdir(out / lora.EMBEDS_DIR)) == ["v1.safetensors", "v2.safetensors"]
    with safe_open(out / lora.EMBEDS_FILE, "pt") as f:
        rows, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert json.loads(meta.pop("tokens")) == ["<v1>", "<v2>"] and meta == META, meta
    for i, (token, (vec_l, vec_g)) in enumerate(sdxl_run.embeds.items()):
        assert torch.equal(rows["clip_l"][i], vec_l) and torch.equal(rows["clip_g"][i], vec_g), token
        with safe_open(out / lora.EMBEDS_DIR / f"v{i + 1}.safetensors", "pt") as f:
            one = {k: f.get_tensor(k) for k in f.keys()}
        assert {k: tuple(v.shape) for k, v in one.items()} == {"clip_l": (1, 32), "clip_g": (1, 48)}, one
        assert torch.equal(one["clip_l"][0], vec_l) and torch.equal(one["clip_g"][0], vec_g), token
    with safe_open(out / lora.KOHYA_FILE, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_dim"] == "4", meta
    assert alpha.item() == 3.0, alpha
    stems = ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", "lora_unet_middle_block_1_proj_out",
             "lora_unet_output_blocks_8_0_emb_layers_1", "lora_unet_label_emb_0_2", "lora_unet_time_embed_0",
             "lora_te1_text_model_encoder_layers_1_mlp_fc1", "lora_te2_text_model_encoder_layers_0_self_attn_q_proj")
    for stem in stems:
        assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= keys, stem
    assert not any(k.startswith(("lora_te_", "lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block"))
                   for k in keys), sorted(keys)[:5]


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_sdxl_lora_loads_in_diffusers(sdxl_run, fmt):
    """StableDiffusionXLPipeline.load_lora_weights reads our diffusers file and (converting kohya's SGM names
    back) our kohya file; fused, every target in unet, text_encoder and text_encoder_2 is our W + delta."""
    pipe = sdxl_run.pipe()
    pipe.load_lora_weights(str(sdxl_run.out) if fmt == "diffusers" else str(sdxl_run.out / lora.KOHYA_FILE))
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"])
    worst, count = (0.0, ""), 0
    for part, ours in sdxl_run.models.items():
        theirs = getattr(pipe, part)
        for name, m in lora.lora_modules(ours):
            # peft wraps each target: the fused weight is its base_layer's
            module = theirs.get_submodule(name.removeprefix("text_model.") if part == "text_encoder" else name)
            fused = getattr(module, "base_layer", module).weight
            want = m.weight + m.delta()
            assert maxdiff(want, m.weight) > 1e-3, f"{part}.{name}: the LoRA does not change the weight"
            worst = max(worst, (maxdiff(fused, want), f"{part}.{name}"))
            count += 1
    assert count == sum(len(lora.lora_modules(m)) for m in sdxl_run.models.values())
    assert worst[0] < 1e-6, f"{fmt}: fused weight vs W + delta: max abs diff {worst[0]} at {worst[1]}"


def test_sdxl_embeddings_load_in_diffusers(sdxl_run):
    """diffusers' load_textual_inversion, per encoder, puts our rows into both text encoders: from
    EMBEDS_FILE (all tokens at once) and from a token's A1111/ComfyUI file."""
    with safe_open(sdxl_run.out / lora.EMBEDS_FILE, "pt") as f:
        rows, tokens = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["tokens"])
    with safe_open(sdxl_run.out / lora.EMBEDS_DIR / "v2.safetensors", "pt") as f:
        one = {k: f.get_tensor(k) for k in f.keys()}
    for source, names in ((rows, tokens), (one, "<v2>")):
        pipe = sdxl_run.pipe()
        encoders = ((pipe.tokenizer, pipe.text_encoder, "clip_l"), (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g"))
        for tokenizer, te, key in encoders:
            pipe.load_textual_inversion(source[key], token=names, text_encoder=te, tokenizer=tokenizer)
        for token in [names] if isinstance(names, str) else names:
            for (tokenizer, te, _), vec in zip(encoders, sdxl_run.embeds[token]):
                row = te.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)]
                assert torch.equal(row, vec), (token, maxdiff(row, vec))


def tiny_sdxl(seed=0):
    """A stand-in SDXL StableDiffusion for load_result: the tiny SDXL UNet, two of our CLIP text encoders
    (32 and 48 wide) and a tokenizer for each."""
    torch.manual_seed(seed)
    vocab = len(tiny_tokenizer().vocab)
    cfg = dict(vocab_size=vocab, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    te, te_2 = CLIPTextModel(TextConfig(hidden_size=32, **cfg)), CLIPTextModel(TextConfig(hidden_size=48, **cfg))
    return SimpleNamespace(unet=sdxl_unet(seed), text_encoder=te.eval(), text_encoder_2=te_2.eval(),
                           tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer())


def test_sdxl_load_result_round_trip(tmp_path):
    """save_result then load_result on SDXL: the tokens' rows in both encoders, every LoRA update at the given
    UNet and text scales, and a weight of text_encoder_2 trained in full; an SDXL run into an SD1.x model,
    an SD1.x run into SDXL, and SD1.x embeds for an SDXL UNet are errors that say so."""
    pytest.importorskip("diffusers")
    trained = tiny_sdxl()
    g = torch.Generator().manual_seed(0)
    lora.inject(trained.unet, lora.PAPER_UNET, rank=4, alpha=2, generator=g)
    lora.inject(trained.text_encoder, lora.OFFICIAL_TEXT_ENCODER, rank=4, alpha=2, generator=g)
    lora.inject(trained.text_encoder_2, lora.OFFICIAL_TEXT_ENCODER, rank=2, alpha=3, generator=g)
    randomise_b(trained.unet, trained.text_encoder, trained.text_encoder_2)
    embeds = {t: (torch.randn(32, generator=g), torch.randn(48, generator=g)) for t in ("<v1>", "<v2>")}
    norm = torch.randn(48, generator=g)
    lora.save_result(str(tmp_path), trained.unet, trained.text_encoder, embeds, META,
                     weights={"text_encoder_2.text_model.final_layer_norm.weight": norm},
                     text_encoder_2=trained.text_encoder_2)
    sd = tiny_sdxl()
    assert lora.load_result(sd, str(tmp_path), scale=0.6, text_scale=0.9) == ["<v1>", "<v2>"]
    for token, (vec_l, vec_g) in embeds.items():
        for tokenizer, te, vec in ((sd.tokenizer, sd.text_encoder, vec_l), (sd.tokenizer_2, sd.text_encoder_2, vec_g)):
            row = te.text_model.embeddings.token_embedding.weight[tokenizer.tok.token_to_id(token)]
            assert torch.equal(row, vec), token
    assert torch.equal(sd.text_encoder_2.text_model.final_layer_norm.weight, norm)
    for part, scale in (("unet", 0.6), ("text_encoder", 0.9), ("text_encoder_2", 0.9)):
        lora.set_scale(getattr(trained, part), scale)
        ours, theirs = dict(lora.lora_modules(getattr(trained, part))), dict(lora.lora_modules(getattr(sd, part)))
        assert ours.keys() == theirs.keys(), (part, sorted(ours.keys() ^ theirs.keys())[:3])
        d = max(maxdiff(ours[n].delta(), theirs[n].delta()) for n in ours)
        assert d < 1e-6, f"{part}: loaded vs saved LoRA update: max abs diff {d}"

    with pytest.raises(ValueError, match="is an SDXL run's, and the model is an SD1.x one"):
        lora.load_result(StableDiffusion.tiny(), str(tmp_path))
    save_run(tmp_path / "sd15")
    with pytest.raises(ValueError, match="is an SD1.x run's, and the model is an SDXL one"):
        lora.load_result(tiny_sdxl(), str(tmp_path / "sd15"))
    with pytest.raises(ValueError, match="SDXL UNet takes embeds as"):
        lora.save_result(str(tmp_path / "bad"), trained.unet, None, {"<v1>": torch.zeros(32)}, META)
