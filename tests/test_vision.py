"""model.py's CLIP image tower and clip_preprocess against transformers, plus loading, the tiny tower and errors.
Run: python -m pytest -q tests/test_vision.py   (full ViT-L/14: python -m pytest -q -m slow tests/test_vision.py)"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import model
from conftest import rel_err

TOL = 1e-4  # relative max abs difference allowed in fp32
# a small config unlike the tiny tower's: 5x5 patches of 6 px, 4 heads of 12, an odd MLP width
SMALL = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=30,
             patch_size=6, projection_dim=24)

def randomise_norms(m):
    """Random LayerNorm affine parameters, so a swapped weight and bias (or a skipped norm) would show."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m

def photo(h, w, seed):
    """A real-looking (h, w, 3) uint8 image: smooth colour gradients, fine noise texture and a flat sharp-edged box."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([0.5 + 0.3 * np.sin(2 * np.pi * (g.uniform(0.5, 3) * x + g.uniform(0.5, 3) * y) + g.uniform(0, 6))
                    + 0.25 * (x - 0.5) * g.uniform(-1, 1) for _ in range(3)], axis=-1)
    img += g.normal(0, 0.06, img.shape)
    img[h // 4:h // 4 + h // 3, w // 3:w // 3 + w // 4] = g.uniform(0, 1, 3)
    return (img.clip(0, 1) * 255).round().astype(np.uint8)

def as_tensor(u):
    """(h, w, 3) uint8 -> (1, 3, h, w) float in [0, 1]."""
    return torch.from_numpy(u).permute(2, 0, 1)[None].float() / 255

@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_matches_transformers(tmp_path, hidden_act):
    """A folder saved by transformers' CLIPVisionModelWithProjection loads strictly and gives its image_embeds."""
    import transformers
    torch.manual_seed(0)
    ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(hidden_act=hidden_act, **SMALL))
    randomise_norms(ref.eval()).save_pretrained(tmp_path)
    ours = model.CLIPVisionModel.from_pretrained(str(tmp_path))
    px = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        err = rel_err(ours(px), ref(pixel_values=px).image_embeds)
    assert err < TOL, f"image_embeds rel err {err:.2e} ({hidden_act})"

def test_full_clip_folder(tmp_path):
    """A full CLIP folder gives CLIPModel's image features: text tower skipped, top-level projection_dim applies."""
    import transformers
    torch.manual_seed(1)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    ref = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=SMALL, projection_dim=20))
    randomise_norms(ref.eval()).save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    # the layout of older files (openai's): vision_config_dict repeats fields and wins; give vision_config stale ones
    fields = ("hidden_size", "num_hidden_layers", "patch_size")
    cfg["vision_config_dict"] = {k: cfg["vision_config"][k] for k in fields}
    cfg["vision_config"].update(hidden_size=1024, num_hidden_layers=24, patch_size=14)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    sd = load_file(tmp_path / "model.safetensors")
    sd["vision_model.embeddings.position_ids"] = torch.arange(26)[None]  # a buffer older files stored
    save_file(sd, tmp_path / "model.safetensors")
    ours = model.CLIPVisionModel.from_pretrained(str(tmp_path))
    assert ours.config.projection_dim == 20 and ours.config.hidden_size == 48, ours.config
    px = torch.randn(3, 3, 30, 30)
    with torch.no_grad():
        err = rel_err(ours(px), ref.visual_projection(ref.vision_model(pixel_values=px).pooler_output))
    assert err < TOL, f"image features rel err {err:.2e}"

def test_save_pretrained_round_trip(tmp_path):
    """save_pretrained writes a folder transformers' CLIPVisionModelWithProjection reads, with equal outputs."""
    import transformers
    ours = model.CLIPVisionModel.tiny()
    ours.save_pretrained(tmp_path)
    ref = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path).eval()
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        err = rel_err(ours(px), ref(pixel_values=px).image_embeds)
    assert err < TOL, f"image_embeds rel err {err:.2e}"
    again = model.CLIPVisionModel.from_pretrained(str(tmp_path))
    assert torch.equal(again(px), ours(px))

@pytest.mark.parametrize("tower,folder,out", [("CLIPVisionModel", "tiny-clip", (2, 16)),  # projected embeddings
                                              ("ViT", "tiny-dino", (2, 17, 32))])  # 1 + 16 tokens, width 32
def test_tiny_is_cached_and_seeded_locally(tmp_path, monkeypatch, tower, folder, out):
    """An image tower's from_pretrained("tiny") (CLIP's, DINO's) builds once into XDG_CACHE_HOME, equals
    tiny(seed=0), differs from tiny(seed=1), runs on 32 px images and leaves the global RNG alone."""
    cls = getattr(model, tower)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = cls.from_pretrained("tiny")
    weights = tmp_path / "magicapture" / folder / "model.safetensors"
    built = weights.stat().st_mtime_ns
    b, c = cls.from_pretrained("tiny"), cls.tiny(seed=1)
    assert torch.equal(torch.get_rng_state(), state), "building or loading the tiny tower changed the global RNG"
    assert weights.stat().st_mtime_ns == built, "the second load rebuilt the tiny tower"
    fresh = cls.tiny().state_dict()
    for name, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[name]) and torch.equal(v, fresh[name]), f"{name} differs between loads"
    assert any(not torch.equal(v, c.state_dict()[name]) for name, v in a.state_dict().items()), \
        "seed=1 gave seed 0's weights"
    assert a(torch.randn(2, 3, 32, 32)).shape == out

@pytest.mark.parametrize("tower,repo", [("CLIPVisionModel", "openai/clip-vit-large-patch14"),
                                        ("ViT", "facebook/dino-vitb8")])
def test_offline_without_cache_is_clear(tmp_path, tower, repo):
    """With HF_HUB_OFFLINE=1 and an empty cache, an image tower's default repo (CLIP's, DINO's) fails within
    seconds with the download command."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    t = time.time()
    r = subprocess.run([sys.executable, "-c", f"import model; model.{tower}.from_pretrained()"], env=env,
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    seconds = time.time() - t
    assert r.returncode != 0 and seconds < 10, f"exit {r.returncode} after {seconds:.1f} s"
    want = f"hf download {repo} config.json model.safetensors --local-dir DIR"
    assert "HF_HUB_OFFLINE=1" in r.stderr and want in r.stderr and "During handling" not in r.stderr, r.stderr[-2000:]

def test_bad_inputs_are_clear(tmp_path):
    """Unknown hidden_act or model_type, no weights file, a wrong image size, uint8 pixels: errors that say so."""
    model.CLIPVisionModel.tiny().save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        good = json.load(f)
    for key, value in (("hidden_act", "gelu_new"), ("model_type", "siglip_vision_model")):
        with open(tmp_path / "config.json", "w") as f:
            json.dump({**good, key: value}, f)
        with pytest.raises(ValueError, match=f"{key}='{value}'"):
            model.CLIPVisionModel.from_pretrained(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        model.CLIPVisionModel.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"clip_preprocess\(images, size=32\)"):
        model.CLIPVisionModel.tiny()(torch.randn(1, 3, 64, 64))
    with pytest.raises(TypeError, match="divide 8-bit images by 255"):
        model.clip_preprocess(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))

SIZES = [(300, 400), (400, 300), (512, 512), (180, 200), (225, 301), (64, 64), (100, 150)]  # the last two upscale

def test_preprocess_matches_transformers():
    """clip_preprocess equals CLIPImageProcessor (PIL) up to its 8-bit rounding (measured max 0.016, mean 0.0044)."""
    import transformers
    # transformers 5 names the PIL processor CLIPImageProcessorPil (its CLIPImageProcessor needs torchvision)
    proc = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)()
    for h, w in SIZES:
        u = [photo(h, w, seed) for seed in (0, 1)]
        ref = proc(images=u, return_tensors="pt")["pixel_values"]
        ours = model.clip_preprocess(torch.cat([as_tensor(x) for x in u]))
        assert ours.shape == ref.shape == (2, 3, 224, 224), f"{h}x{w}: {ours.shape} vs {ref.shape}"
        d = (ours - ref).abs()
        # two roundings of half an 8-bit step: up to 1/255 / 0.2613 (the smallest std) = 0.015
        assert d.max() < 2e-2 and d.mean() < 5e-3, f"{h}x{w}: max {d.max():.4f} mean {d.mean():.5f}"

def test_preprocess_resamples_as_pil():
    """Without 8-bit rounding, clip_preprocess is PIL's bicubic resize, crop and normalisation to 1e-4."""
    # PIL in float mode, width pass then height pass, each clipped to [0, 1] as 8-bit PIL clips
    from PIL import Image
    mean, std = torch.tensor(model.CLIP_MEAN)[:, None, None], torch.tensor(model.CLIP_STD)[:, None, None]
    for h, w in SIZES:
        u = photo(h, w, 2)
        th, tw = (224, 224 * w // h) if h <= w else (224 * h // w, 224)
        chans = []
        for c in range(3):
            im = Image.fromarray(u[..., c].astype(np.float32) / 255, mode="F")
            im = Image.fromarray(np.asarray(im.resize((tw, h), Image.BICUBIC)).clip(0, 1), mode="F")
            chans.append(np.asarray(im.resize((tw, th), Image.BICUBIC)).clip(0, 1))
        top, left = (th - 224) // 2, (tw - 224) // 2
        ref = (torch.from_numpy(np.stack(chans))[:, top:top + 224, left:left + 224] - mean) / std
        err = (model.clip_preprocess(as_tensor(u))[0] - ref).abs().max().item()
        assert err < 1e-4, f"{h}x{w}: max abs difference {err:.2e} from PIL's float bicubic"

# openai/clip-vit-large-patch14's vision_config (the fields model.py reads), as published
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, num_channels=3,
               image_size=224, patch_size=14, projection_dim=768, layer_norm_eps=1e-5, hidden_act="quick_gelu")

@pytest.mark.slow
def test_full_vit_l14(tmp_path):
    """Random ViT-L/14 (304.0 M) equals transformers on 2 images at 224 px (about 15 s, peak RSS 2.7 GiB, 2 cores)."""
    # time and peak RSS of `python -m pytest -q -m slow tests/test_vision.py` under /usr/bin/time -v
    import transformers
    assert model.VisionConfig() == model.VisionConfig(**VIT_L14)
    torch.manual_seed(0)
    ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VIT_L14))
    randomise_norms(ref.eval()).save_pretrained(tmp_path)
    ours = model.CLIPVisionModel.from_pretrained(str(tmp_path))
    n = sum(p.numel() for p in ours.parameters())
    assert round(n / 1e6, 1) == 304.0, f"{n} parameters"
    px = torch.cat([model.clip_preprocess(as_tensor(photo(h, w, 0))) for h, w in ((300, 400), (512, 512))])
    with torch.no_grad():
        err = rel_err(ours(px), ref(pixel_values=px).image_embeds)
    assert err < TOL, f"image_embeds rel err {err:.2e}"
