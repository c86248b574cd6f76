"""sample.py end to end on the tiny pipeline: PNGs per seed, a grid, reproducible by seed; training results
given as a folder or either file; settings and prompts checked before sampling.
Run: python -m pytest -q tests/test_sample.py"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import lora
import standins
from conftest import run_script, stop_on_call
from model import StableDiffusion

SMALL = ["--num_samples=1", "--height=64", "--width=64"]

def run(cache, *args):
    return run_script("sample.py", "--steps=3", "--device=cpu", "--dtype=fp32", *args, cache=cache)

def image(folder, name="seed0.png"):
    return np.asarray(Image.open(os.path.join(folder, name))).astype(int)

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An XDG cache holding the tiny pipeline, and two training results built on it without train.py:
    `lora` (random UNet and text encoder LoRA, tokens <v1> <v2>, a config.json with attn_resolutions)
    and `embeds_only` (tokens only, as a run with phase 2 of 0 steps)."""
    root = tmp_path_factory.mktemp("sample")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        sd = StableDiffusion.from_pretrained("tiny")
    g = torch.Generator().manual_seed(0)
    width = sd.text_encoder.text_model.embeddings.token_embedding.embedding_dim
    embeds = {tok: torch.randn(width, generator=g) for tok in ("<v1>", "<v2>")}
    lora.save_result(str(root / "embeds_only"), sd.unet, None, embeds, {})
    lora.inject(sd.unet, lora.PAPER_UNET, rank=4, generator=g)
    lora.inject(sd.text_encoder, lora.OFFICIAL_TEXT_ENCODER, rank=4, generator=g)
    with torch.no_grad():
        for p in lora.lora_parameters(sd.unet) + lora.lora_parameters(sd.text_encoder):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lora.save_result(str(root / "lora"), sd.unet, sd.text_encoder, embeds, {})
    with open(root / "lora" / "config.json", "w") as f:
        json.dump(dict(attn_resolutions=[4]), f)  # what train.py writes; --attention reads it
    return dict(cache=root / "cache", lora=root / "lora", embeds_only=root / "embeds_only")

def test_sample_writes_images_and_grid(runs, tmp_path):
    """3 images in batches of 2 give seed PNGs and a grid; seed 1 alone redraws the same image
    (to one 8-bit level: batched matmuls round differently). A second call into the folder is refused, and
    with --overwrite replaces all of the first call's files."""
    out = tmp_path / "a"
    r = run(runs["cache"], f"--out_dir={out}", "--num_samples=3", "--batch_size=2", "--height=64", "--width=64")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["grid.png", "sample.json", "seed0.png", "seed1.png", "seed2.png"]
    assert str(out) in r.stdout
    assert Image.open(out / "grid.png").size == (3 * 64, 64)
    again = tmp_path / "b"
    r = run(runs["cache"], f"--out_dir={again}", "--num_samples=1", "--seed=1", "--height=64", "--width=64")
    assert r.returncode == 0, r.stderr[-2000:]
    d = np.abs(image(out, "seed1.png") - image(again, "seed1.png")).max()
    assert d <= 1, f"seed 1 alone differs from seed 1 in a batch by {d} levels"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    r = run(runs["cache"], f"--out_dir={out}", "--num_samples=1", "--height=64", "--width=64")
    assert r.returncode != 0 and "--overwrite" in r.stderr, r.stderr[-2000:]  # an earlier call's images are there
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
    r = run(runs["cache"], f"--out_dir={out}", "--num_samples=1", "--height=64", "--width=64", "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["grid.png", "sample.json", "seed0.png"]  # none of the first call's left

def test_sample_lora_folder_or_either_file(runs, tmp_path):
    """--lora takes the run folder or either of its two files and draws the same image (LoRA merged,
    tokens added), unlike the base model's; a run with embeddings only loads its tokens."""
    prompt = "--prompt=a photo of <v1> person in the <v2> style"
    r = run(runs["cache"], f"--out_dir={tmp_path / 'base'}", *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("", lora.LORA_FILE, lora.EMBEDS_FILE):
        r = run(runs["cache"], f"--out_dir={tmp_path / (name or 'folder')}", f"--lora={runs['lora'] / name}",
                prompt, *SMALL)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "its tokens: <v1> <v2>" in r.stdout, r.stdout
    folder = image(tmp_path / "folder")
    for name in (lora.LORA_FILE, lora.EMBEDS_FILE):
        d = np.abs(image(tmp_path / name) - folder).max()
        assert d == 0, f"--lora=<run>/{name} differs from --lora=<run> by {d} levels"
    d = np.abs(image(tmp_path / "base") - folder).mean()
    assert d > 1, f"the LoRA run's image is within {d:.2f} levels (mean) of the base model's"
    r = run(runs["cache"], f"--out_dir={tmp_path / 'embeds'}", f"--lora={runs['embeds_only']}", prompt, *SMALL,
            "--lora_scale_text=0.9")  # config/sample_official.py's, for a run without a text-encoder LoRA
    assert r.returncode == 0 and "its tokens: <v1> <v2>" in r.stdout, r.stderr[-2000:]
    assert "trained no text-encoder LoRA: --lora_scale_text=0.9 has nothing to scale" in r.stdout, r.stdout

def test_sample_attention_from_a_file(runs, tmp_path):
    """--attention with --lora pointing at a file finds the run's config.json beside it and writes the
    image | <v1> | <v2> panels."""
    out = tmp_path / "att"
    r = run(runs["cache"], f"--out_dir={out}", f"--lora={runs['lora'] / lora.EMBEDS_FILE}", "--attention",
            "--prompt=a photo of <v1> person in the <v2> style", *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(out / "seed0_attention.png").size == (3 * 64, 64)

@pytest.mark.parametrize("target,message", [
    ("nowhere", "nowhere: no such folder or file; expected a training run's folder"),
    (lora.KOHYA_FILE, "is not a training result; expected a training run's folder"),
    ("..", "has no learned_embeds.safetensors"),  # a folder that is not a run
])
def test_sample_lora_errors(runs, tmp_path, target, message):
    """--lora at a missing path, at a file that is neither of the two, or at a folder without embeddings
    stops with a message naming the path, not a traceback."""
    r = run(runs["cache"], f"--out_dir={tmp_path}", f"--lora={runs['lora'] / target}", *SMALL)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"--lora={runs['lora'] / target}" in r.stderr

def test_sample_lora_file_lost_and_upper_case_tokens(runs, tmp_path):
    """A run whose config.json says it trained a LoRA but whose LoRA file is gone (a partial copy) stops instead of
    drawing without it; <V1> is <v1> to the tokenizer (it lower-cases), so it draws without warnings."""
    import shutil
    partial = tmp_path / "partial"
    shutil.copytree(runs["lora"], partial)
    (partial / lora.LORA_FILE).unlink()
    (partial / "config.json").write_text(json.dumps(dict(lora_targets=list(lora.PAPER_UNET), phase2_steps=10)))
    r = run(runs["cache"], f"--out_dir={tmp_path / 'a'}", f"--lora={partial}", *SMALL)
    assert r.returncode != 0 and "is missing, and the run's config.json says it trained a LoRA" in r.stderr, r.stderr
    r = run(runs["cache"], f"--out_dir={tmp_path / 'b'}", f"--lora={runs['lora']}", *SMALL,
            "--prompt=a photo of <V1> person in the <v2> style")
    assert r.returncode == 0 and "warning" not in r.stdout, r.stdout[-2000:]

def test_sample_ctrl_c_keeps_what_was_drawn(runs, tmp_path, monkeypatch):
    """Ctrl-C during the second batch: the first batch's images stay, with sample.json (their settings) written
    before drawing, and the exit code is 130."""
    real = StableDiffusion.sample
    monkeypatch.setattr(StableDiffusion, "sample", stop_on_call(real, 2))
    out = tmp_path / "stopped"
    r = run(runs["cache"], f"--out_dir={out}", "--num_samples=3", "--batch_size=2", "--height=64", "--width=64")
    assert r.returncode == 130 and "stopped: 2 of 3 images drawn" in r.stderr, r.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["sample.json", "seed0.png", "seed1.png"]
    assert json.load(open(out / "sample.json"))["num_samples"] == 3
    # the first batch stopped: no image, no record, so the same command runs again
    monkeypatch.setattr(StableDiffusion, "sample", stop_on_call(real, 1))
    out = tmp_path / "first"
    r = run(runs["cache"], f"--out_dir={out}", "--num_samples=1", "--height=64", "--width=64")
    assert r.returncode == 130 and os.listdir(out) == [], r.stderr[-2000:]
    r = run(runs["cache"], f"--out_dir={out}", "--num_samples=1", "--height=64", "--width=64")
    assert r.returncode == 0 and sorted(os.listdir(out)) == ["grid.png", "sample.json", "seed0.png"], r.stderr

def test_sample_placeholder_past_77_tokens(runs, tmp_path):
    """A prompt whose placeholder falls past CLIP's 77 tokens stops with the tokenizer's message before
    sampling (its embedding would never be read)."""
    r = run(runs["cache"], f"--out_dir={tmp_path}", f"--lora={runs['lora']}", *SMALL,
            "--prompt=" + "a photo " * 40 + "of <v1> person")
    assert r.returncode != 0 and "placeholder '<v1>'" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "seed0.png")

@pytest.mark.parametrize("args,message", [
    (["--guidence=3"], "did you mean 'guidance'"),
    (["--dtype=fp8"], "dtype must be one of 'fp32', 'bf16', 'fp16'; got 'fp8'"),
    (["--sampler=plms"], "sampler must be one of 'ddim', 'euler_a'; got 'plms'"),
    (["--device=cuda"], "device='cuda' but PyTorch sees no CUDA GPU (torch.cuda.is_available() is False): "
                        "use --device=cpu"),
    (["--device=gpu"], "device='gpu' is not a device: use --device=cpu"),
    (["--attention"], "give a training result with --lora"),
    (["--steps=0"], "steps, num_samples and batch_size must be >= 1, got 0"),
    (["--height=100"], "height must be None (the model's size) or a multiple of 8 pixels, got 100"),
    (["--postprocess", "--upscaler_model=none.onnx"], "upscaler model file not found: none.onnx"),
    (["--seed=-1"], "seed must be in [0, 2^63 - num_samples), got -1"),
    (["--out_dir=README.md"], "out_dir README.md is a file"),  # os.makedirs failed after the model loaded
    (["--postprocess", "--upscale_factor=0"], "--upscale_factor) must be > 0, got 0"),  # cv2 failed after drawing
    (["--postprocess", "--restore_weight=3.0"], "--restore_weight) must be in [0, 1], got 3.0"),  # was taken
])
def test_sample_checks_settings_first(tmp_path, args, message):
    """A misspelt setting, a value outside its set, a device this machine lacks (it has no GPU) stop
    before any model loads (the tiny pipeline is never built in the empty cache)."""
    if "cuda" in args[0] and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    r = run(tmp_path / "cache", f"--out_dir={tmp_path / 'out'}", *args)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "cache" / "magicapture"), "a model was loaded before the settings were checked"

def test_sample_checks_against_the_model_before_drawing(runs, tmp_path, monkeypatch):
    """Past the model's load, before drawing: DDIM steps past the schedule, --attention at a size without the
    run's maps, a run trained on a model of another text-encoder width (its config's init_from named), an
    unfinished run; tokens the run did not learn are reported. A folder called tiny in the working directory is
    not the tiny model."""
    r = run(runs["cache"], f"--out_dir={tmp_path / 'a'}", f"--lora={runs['lora']}", "--steps=1000",
            "--prompt=a photo of <v3> person")
    assert r.returncode != 0 and "--steps=1000: DDIM takes 1 to 999 steps" in r.stderr, r.stderr[-2000:]
    assert "<v3> in the prompt: not a learned token (<v1> <v2>)" in r.stdout, r.stdout[-2000:]
    assert "uses none of the learned tokens (<v1> <v2>)" in r.stdout, r.stdout[-2000:]
    r = run(runs["cache"], f"--out_dir={tmp_path / 'b'}", f"--lora={runs['lora']}", "--attention", "--height=8",
            "--width=8")
    assert r.returncode != 0 and "no cross-attention map is [4] on a side" in r.stderr, r.stderr[-2000:]
    wide = tmp_path / "sd15_run"
    sd = StableDiffusion.from_pretrained(str(runs["cache"] / "magicapture" / "tiny-sd"))
    lora.save_result(str(wide), sd.unet, None, {"<v1>": torch.zeros(768), "<v2>": torch.zeros(768)}, {})
    with open(wide / "config.json", "w") as f:
        json.dump(dict(init_from="stable-diffusion-v1-5/stable-diffusion-v1-5"), f)
    r = run(runs["cache"], f"--out_dir={tmp_path / 'c'}", f"--lora={wide}")
    assert "was trained on stable-diffusion-v1-5/stable-diffusion-v1-5, and this draws with tiny" in r.stdout
    assert r.returncode != 0 and "holds token vectors 768 wide" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    r = run(runs["cache"], f"--out_dir={tmp_path / 'd'}", f"--lora={tmp_path / 'unfinished'}")
    assert r.returncode != 0 and "an unfinished run" in r.stderr and "--resume" in r.stderr, r.stderr[-2000:]
    assert not any(os.path.exists(tmp_path / d) for d in "abcd")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(runs["cache"]))
    (tmp_path / "tiny").mkdir()
    assert StableDiffusion.from_pretrained("tiny").unet is not None

def test_sample_help_after_config(tmp_path):
    """--help after a config file shows the config's values beside the defaults, and loads nothing."""
    r = run(tmp_path / "cache", "config/sample_official.py", "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    for line in ("  sampler = 'euler_a'    (default 'ddim')", "  lora_scale = 0.6    (default 1.0)",
                 "  guidance = 7.0    (default 7.5)", "  seed = 0\n"):
        assert line in r.stdout, f"{line!r} not in:\n{r.stdout}"

def test_sample_postprocess(runs, tmp_path):
    """--postprocess writes the enhanced image (2x, faces restored) and a before | after comparison."""
    m = dict(upscaler=standins.upscaler(str(tmp_path / "up.onnx")),
             restorer=standins.restorer(str(tmp_path / "re.onnx"), colour=(0, 255, 0)),
             detector=standins.detector(str(tmp_path / "det.onnx"), [dict(
                 box=(200, 200, 440, 480), score=0.9,
                 landmarks=[(270, 300), (370, 300), (320, 360), (280, 420), (360, 420)])]))
    out = tmp_path / "p"
    r = run(runs["cache"], f"--out_dir={out}", *SMALL, "--postprocess", *[f"--{k}_model={v}" for k, v in m.items()])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restored 1 face" in r.stdout and "upscaled 64x64 -> 128x128" in r.stdout
    enhanced = np.asarray(Image.open(out / "seed0_enhanced.png"))
    assert enhanced.shape == (128, 128, 3)
    assert Image.open(out / "seed0_compare.png").size == (256, 128)
    # the stand-in restorer paints the face green: the face centre (letterbox 320,340 -> 32,34 -> x2) is green
    assert tuple(enhanced[68, 64]) == (0, 255, 0), enhanced[68, 64]
    # the official script's way: no Real-ESRGAN file needed, the faces blended through a parsing mask
    del m["upscaler"]
    m["parser"] = standins.parser(str(tmp_path / "parse.onnx"), np.ones((512, 512), int))  # all skin
    r = run(runs["cache"], f"--out_dir={tmp_path / 'b'}", *SMALL, "--postprocess", "--upsampler=bilinear",
            "--restore_parse=True", *[f"--{k}_model={v}" for k, v in m.items()])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restored 1 face" in r.stdout and "upscaled 64x64 -> 128x128 (bilinear)" in r.stdout
    enhanced = np.asarray(Image.open(tmp_path / "b" / "seed0_enhanced.png"))
    assert enhanced.shape == (128, 128, 3) and tuple(enhanced[68, 64]) == (0, 255, 0), enhanced[68, 64]
