"""
LoRA injection, scaling, merging and files (lora.py), on small stand-in
modules with the SD1.5 attribute paths; a training run's outputs saved and
loaded on the tiny pipeline; plus one interop check against diffusers + peft
loading our files into their own UNet and CLIP text encoder.
Run: python -m pytest -q tests/test_lora.py
"""

import os
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

import lora
from model import StableDiffusion

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
    lora.inject(unet, [r".*ff\.net\.0\.proj"], rank=4)
    _, m = lora.lora_modules(unet)[0]
    assert m.lora_B.weight.abs().max() == 0
    std = m.lora_A.weight.std().item()
    assert 0.15 < std < 0.35, f"lora_A std {std}, expected about 0.25"


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
    lora.merge(sd.unet)
    lora.merge(sd.text_encoder)
    d = maxdiff(draw(sd, "a photo"), ref)
    assert d < 1e-4, f"merged vs unmerged sample: max abs diff {d} (pixels in [0, 1])"
    sd = tiny_with_lora()
    lora.set_scale(sd.unet, 0.0)
    lora.set_scale(sd.text_encoder, 0.0)
    lora.merge(sd.unet)
    lora.merge(sd.text_encoder)
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
    assert sorted(os.listdir(tmp_path / "run")) == sorted([lora.EMBEDS_FILE, lora.LORA_FILE, lora.KOHYA_FILE])
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
    assert os.listdir(tmp_path) == [lora.EMBEDS_FILE]
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


def test_load_lora_file_leaves_global_rng(tmp_path):
    """Loading a LoRA file injects the layers it names without drawing from the global RNG."""
    unet, *_ = make_models()
    lora.inject(unet, lora.PAPER_UNET)
    lora.save_lora_file(unet, None, tmp_path / lora.LORA_FILE)
    unet2, _, _, _ = make_models()
    state = torch.get_rng_state()
    lora.load_lora_file(unet2, None, tmp_path / lora.LORA_FILE)
    assert torch.equal(torch.get_rng_state(), state), "load_lora_file advanced the global RNG"
