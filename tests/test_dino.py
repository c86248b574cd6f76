"""model.py's DINO ViT and dino_preprocess against transformers' ViTModel and PIL; loading, the tiny ViT, errors.
Run: python -m pytest -q tests/test_dino.py   (full ViT-B/8: python -m pytest -q -m slow tests/test_dino.py)"""
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import load_file, save_file

import model
from conftest import hub_cache, rel_err

TOL = 1e-4  # relative max abs difference allowed in fp32
# a small config unlike the tiny ViT's: 3 layers, 4 heads of 12, an odd MLP width, a 4x4 grid of 8 px patches
SMALL = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=32,
             patch_size=8)

def file_name(ref_key):
    """A parameter name of transformers 5's ViTModel -> the name in its saved file (the Hub's, which model.py's
    module paths copy): transformers 5 renamed the modules and translates when it saves and loads."""
    k = re.sub(r"^layers\.", "encoder.layer.", ref_key)
    for new, old in (("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
                     ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
                     ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
        k = k.replace(new, old)
    return k

def reference(cfg, seed=0):
    """A random transformers ViTModel (with its pooler, as transformers builds it by default) whose LayerNorm
    affine parameters and position embeddings are randomised too, so a swapped weight and bias, a skipped norm or
    a wrong resampling of the positions would show."""
    import transformers
    torch.manual_seed(seed)
    ref = transformers.ViTModel(transformers.ViTConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        ref.embeddings.position_embeddings.normal_()
    return ref

def ref_outputs(ref, px, last_block=False):
    """transformers' last_hidden_state and the last layer's keys (B, heads, T, head_dim), the latter from a forward
    hook on its key projection; positions are resampled when px is not the configured size. last_block: the last
    layer's output before the final layernorm (hidden_states[-1]) instead of last_hidden_state."""
    got = []
    hook = ref.layers[-1].attention.k_proj.register_forward_hook(lambda mod, inp, out: got.append(out))
    S = ref.config.image_size
    with torch.no_grad():
        out = ref(pixel_values=px, interpolate_pos_encoding=tuple(px.shape[-2:]) != (S, S), output_hidden_states=True)
    hook.remove()
    B, T, D = got[0].shape
    heads = ref.config.num_attention_heads
    keys = got[0].view(B, T, heads, D // heads).transpose(1, 2)
    return out.hidden_states[-1] if last_block else out.last_hidden_state, keys

def assert_same_weights(ours, ref):
    """Every parameter of ref sits, under its file name, in ours with equal values, and ours has nothing else."""
    mine = ours.state_dict()
    theirs = {file_name(k): v for k, v in ref.state_dict().items() if not k.startswith("pooler.")}
    assert set(mine) == set(theirs), f"only ours: {sorted(set(mine) - set(theirs))[:5]}, " \
                                     f"only transformers': {sorted(set(theirs) - set(mine))[:5]}"
    for k, v in theirs.items():
        assert torch.equal(mine[k], v), f"{k}: max abs difference {(mine[k] - v).abs().max():.2e}"

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(reference ViTModel, folder it was saved to by transformers' save_pretrained)."""
    path = tmp_path_factory.mktemp("dino-ref")
    ref = reference(SMALL)
    ref.save_pretrained(path)
    return ref, path

def test_file_names_are_what_transformers_writes(saved):
    """file_name maps transformers 5's parameter names onto exactly the keys its save_pretrained writes."""
    ref, path = saved
    written = set(load_file(path / "model.safetensors"))
    mapped = {file_name(k) for k in ref.state_dict()}
    assert mapped == written, f"mapped only: {sorted(mapped - written)[:5]}, file only: {sorted(written - mapped)[:5]}"
    assert "pooler.dense.weight" in written, "the reference file should carry the pooler that model.py drops"

@pytest.mark.parametrize("hw", [(32, 32), (48, 40), (24, 24)])
def test_matches_transformers(saved, hw):
    """A folder saved by transformers loads strictly (pooler dropped, weights equal) and gives its last_hidden_state,
    its last layer's output before the final layernorm and last-layer keys, at the configured size and at others
    with interpolate_pos_encoding=True."""
    ref, path = saved
    ours = model.ViT.from_pretrained(str(path))
    assert_same_weights(ours, ref)
    px = torch.randn(2, 3, *hw)
    hidden, keys = ours(px), ours.last_block(px)[1]
    ref_hidden, ref_keys = ref_outputs(ref, px)
    grid = (hw[0] // 8) * (hw[1] // 8)
    assert hidden.shape == (2, 1 + grid, 48) and keys.shape == (2, 4, 1 + grid, 12), (hidden.shape, keys.shape)
    err_h, err_k = rel_err(hidden, ref_hidden), rel_err(keys, ref_keys)
    assert err_h < TOL and err_k < TOL, f"{hw}: last_hidden_state rel err {err_h:.2e}, keys rel err {err_k:.2e}"
    block, block_keys = ours.last_block(px)  # eq. 11's [CLS], before the final layernorm (DiffuseIT's)
    ref_block = ref_outputs(ref, px, last_block=True)[0]
    assert not torch.allclose(ref_block, ref_hidden), "the final layernorm changed nothing: the check below is moot"
    assert rel_err(block, ref_block) < TOL and torch.equal(block_keys, keys)

class NotATensor:
    """An object a weights_only unpickler must refuse to build."""

def test_pytorch_model_bin_is_read_with_weights_only(saved, tmp_path):
    """A folder holding only pytorch_model.bin (pooler included) loads with ref's outputs; a .bin that holds a
    non-tensor object is refused, so the file is not fully unpickled; model.safetensors wins when both exist."""
    ref, path = saved
    cfg = (path / "config.json").read_text()
    (tmp_path / "config.json").write_text(cfg)
    torch.save(load_file(path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    ours = model.ViT.from_pretrained(str(tmp_path))
    px = torch.randn(1, 3, 32, 32)
    err = rel_err(ours(px), ref_outputs(ref, px)[0])
    assert err < TOL, f"last_hidden_state rel err {err:.2e} from pytorch_model.bin"

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text(cfg)
    torch.save({**load_file(path / "model.safetensors"), "extra": NotATensor()}, evil / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        model.ViT.from_pretrained(str(evil))

    (evil / "pytorch_model.bin").write_bytes(b"not a pickle")  # never opened: the .safetensors comes first
    save_file(load_file(path / "model.safetensors"), evil / "model.safetensors")
    assert torch.equal(model.ViT.from_pretrained(str(evil))(px), ours(px))

def test_hub_cache_falls_back_to_pytorch_model_bin(saved, tmp_path, monkeypatch):
    """A Hub repo id whose cache holds config.json and pytorch_model.bin only loads offline from the .bin."""
    ref, path = saved
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # any network use would raise
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    torch.save(load_file(path / "model.safetensors"), tmp_path / "weights.bin")
    files = {"config.json": (path / "config.json").read_bytes(),
             "pytorch_model.bin": (tmp_path / "weights.bin").read_bytes()}
    hub_cache(tmp_path, model.DINO_REPO, files)
    ours = model.ViT.from_pretrained(model.DINO_REPO)
    px = torch.randn(1, 3, 32, 32)
    err = rel_err(ours(px), ref_outputs(ref, px)[0])
    assert err < TOL, f"last_hidden_state rel err {err:.2e}"

def test_save_pretrained_round_trip(tmp_path):
    """save_pretrained writes a folder transformers' ViTModel reads with equal weights and outputs, and we read back."""
    import transformers
    ours = model.ViT.tiny()
    ours.save_pretrained(tmp_path)
    ref = transformers.ViTModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    assert_same_weights(ours, ref)
    for hw in ((32, 32), (40, 56)):
        px = torch.randn(2, 3, *hw)
        hidden, keys = ours(px), ours.last_block(px)[1]
        ref_hidden, ref_keys = ref_outputs(ref, px)
        err_h, err_k = rel_err(hidden, ref_hidden), rel_err(keys, ref_keys)
        assert err_h < TOL and err_k < TOL, f"{hw}: last_hidden_state rel err {err_h:.2e}, keys rel err {err_k:.2e}"
    again = model.ViT.from_pretrained(str(tmp_path))
    assert torch.equal(again(px), ours(px))

def test_keys_carry_gradient_to_the_image():
    """Images in [0, 1] -> dino_preprocess -> the last block's keys and [CLS] (eq. 11's) backpropagate to the
    pixels; the ViT stays frozen."""
    vit = model.ViT.tiny()
    images = torch.rand(2, 3, 64, 48, requires_grad=True)
    for which in ("keys", "cls"):
        hidden, keys = vit.last_block(model.dino_preprocess(images, size=32))
        out = keys if which == "keys" else hidden[:, 0]
        images.grad = None
        # a random direction: the squared norm of a layer-normed [CLS] is constant, so it would have no gradient
        (out * torch.randn_like(out)).sum().backward()
        g = images.grad
        per_sample = g.abs().sum(dim=(1, 2, 3))
        assert torch.isfinite(g).all() and (per_sample > 0).all(), f"{which}: gradient per sample {per_sample}"
    assert all(p.grad is None and not p.requires_grad for p in vit.parameters()), "the ViT's weights took gradient"

def test_tiny_output_shapes():
    """The tiny ViT (32 px, patch 8, width 32, 2 heads) returns 1 + 16 tokens and the last layer's keys per head
    (caching and seeding: tests/test_vision.py, for both image towers)."""
    vit, px = model.ViT.tiny(), torch.randn(2, 3, 32, 32)
    hidden, keys = vit(px), vit.last_block(px)[1]
    assert hidden.shape == (2, 17, 32) and keys.shape == (2, 2, 17, 16), (hidden.shape, keys.shape)

def test_bad_inputs_are_clear(tmp_path):
    """Another model_type, hidden_act or qkv_bias, no weights file, uint8 pixels: errors that say so."""
    model.ViT.tiny().save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        good = json.load(f)
    for key, value in (("model_type", "dinov2"), ("hidden_act", "gelu_new"), ("qkv_bias", False)):
        with open(tmp_path / "config.json", "w") as f:
            json.dump({**good, key: value}, f)
        with pytest.raises(ValueError, match=f"{key}={value!r}"):
            model.ViT.from_pretrained(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"has no model.safetensors or pytorch_model.bin"):
        model.ViT.from_pretrained(str(tmp_path))
    with pytest.raises(TypeError, match="divide 8-bit images by 255"):
        model.dino_preprocess(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))

def test_preprocess_resamples_as_pil():
    """dino_preprocess is PIL's bilinear resize of the whole image (float, so no 8-bit rounding), then ImageNet
    mean/std, to 1e-4: down, up and with the aspect changed."""
    from PIL import Image
    mean, std = torch.tensor(model.DINO_MEAN)[:, None, None], torch.tensor(model.DINO_STD)[:, None, None]
    g = np.random.default_rng(0)
    for h, w in ((512, 512), (300, 400), (100, 150)):
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        # smooth colour waves plus pixel noise: the antialiasing filter's width shows on the noise
        img = np.stack([0.5 + 0.3 * np.sin(2 * np.pi * (g.uniform(1, 4) * x + g.uniform(1, 4) * y))
                        + g.normal(0, 0.1, (h, w)) for _ in range(3)]).clip(0, 1).astype(np.float32)
        ref = torch.from_numpy(np.stack([np.asarray(Image.fromarray(c, mode="F").resize((224, 224), Image.BILINEAR))
                                         for c in img]))
        err = (model.dino_preprocess(torch.from_numpy(img)[None])[0] - (ref - mean) / std).abs().max().item()
        assert err < 1e-4, f"{h}x{w}: max abs difference {err:.2e} from PIL's float bilinear"

# facebook/dino-vitb8's config.json (the fields model.py reads), as published
VIT_B8 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, num_channels=3,
              image_size=224, patch_size=8, layer_norm_eps=1e-12)

@pytest.mark.slow
def test_full_vit_b8(tmp_path):
    """Random ViT-B/8 (85.8 M) equals transformers on 2 images at 224 px and 1 at 256 px, last_hidden_state and
    keys (about 19 s, peak RSS 1.1 GiB, on 2 shared CPU cores)."""
    # time and peak RSS of `python -m pytest -q -m slow tests/test_dino.py` under /usr/bin/time -v
    assert model.ViTConfig() == model.ViTConfig(**VIT_B8)
    ref = reference(dict(VIT_B8, hidden_act="gelu", qkv_bias=True))
    ref.save_pretrained(tmp_path)
    ours = model.ViT.from_pretrained(str(tmp_path))
    n = sum(p.numel() for p in ours.parameters())
    assert round(n / 1e6, 1) == 85.8, f"{n} parameters"
    for px in (model.dino_preprocess(torch.rand(2, 3, 512, 512)), torch.randn(1, 3, 256, 256)):
        with torch.no_grad():
            hidden, keys = ours(px), ours.last_block(px)[1]
        ref_hidden, ref_keys = ref_outputs(ref, px)
        err_h, err_k = rel_err(hidden, ref_hidden), rel_err(keys, ref_keys)
        assert err_h < TOL and err_k < TOL, f"{tuple(px.shape)}: rel err hidden {err_h:.2e}, keys {err_k:.2e}"
