"""sample.py end to end on the tiny pipeline: PNGs per seed, a grid, reproducible by seed."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def run(tmp_path, *args):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "sample.py", "--steps=3", "--device=cpu", "--dtype=fp32", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True)

def test_sample_writes_images_and_grid(tmp_path):
    """3 images in batches of 2 give seed PNGs and a grid; seed 1 alone redraws the same image
    (to one 8-bit level: batched matmuls round differently)."""
    out = tmp_path / "a"
    r = run(tmp_path, f"--out_dir={out}", "--num_samples=3", "--batch_size=2", "--height=64", "--width=64")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["grid.png", "sample.json", "seed0.png", "seed1.png", "seed2.png"]
    assert str(out) in r.stdout
    assert Image.open(out / "grid.png").size == (3 * 64, 64)
    again = tmp_path / "b"
    r = run(tmp_path, f"--out_dir={again}", "--num_samples=1", "--seed=1", "--height=64", "--width=64")
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (np.asarray(Image.open(d / "seed1.png")) for d in (out, again))
    assert np.abs(a.astype(int) - b).max() <= 1

def test_sample_rejects_unknown_setting(tmp_path):
    """A misspelt setting stops before any model loads."""
    r = run(tmp_path, "--guidence=3")
    assert r.returncode != 0 and "did you mean 'guidance'" in r.stderr

def test_sample_postprocess(tmp_path):
    """--postprocess writes the enhanced image (2x, faces restored) and a before | after comparison."""
    import standins
    m = dict(upscaler=standins.upscaler(str(tmp_path / "up.onnx")),
             restorer=standins.restorer(str(tmp_path / "re.onnx"), colour=(0, 255, 0)),
             detector=standins.detector(str(tmp_path / "det.onnx"), [dict(
                 box=(200, 200, 440, 480), score=0.9,
                 landmarks=[(270, 300), (370, 300), (320, 360), (280, 420), (360, 420)])]))
    out = tmp_path / "p"
    r = run(tmp_path, f"--out_dir={out}", "--num_samples=1", "--height=64", "--width=64", "--postprocess",
            *[f"--{k}_model={v}" for k, v in m.items()])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restored 1 face" in r.stdout and "upscaled 64x64 -> 128x128" in r.stdout
    enhanced = np.asarray(Image.open(out / "seed0_enhanced.png"))
    assert enhanced.shape == (128, 128, 3)
    assert Image.open(out / "seed0_compare.png").size == (256, 128)
    # the stand-in restorer paints the face green: the face centre (letterbox 320,340 -> 32,34 -> x2) is green
    assert tuple(enhanced[68, 64]) == (0, 255, 0), enhanced[68, 64]
