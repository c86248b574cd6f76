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
