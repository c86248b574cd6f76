"""bench.py runs at a small size, and every row's output (train step: loss and LoRA gradients) matches diffusers'.
Run: python -m pytest tests/test_bench.py
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def test_bench_runs_and_matches_diffusers():
    cmd = [sys.executable, "bench.py", "--resolution=64", "--steps=2", "--repeats=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # a correctness check: one thread cannot stall on a busy machine
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    # table rows: "name  ours  diffusers  ratio | ours MB  diffusers  ratio | max|diff|  rel"
    rows = [line for line in r.stdout.splitlines() if line.count(" | ") == 2 and not line.startswith(" ")]
    names = [row.split(" | ")[0].split()[:2] for row in rows]
    assert names == [["unet", "forward"], ["unet", "fwd+bwd"], ["vae", "decode"], ["ddim", "2"], ["train", "step"]], \
        r.stdout
    for row in rows:
        rel = float(row.split()[-1])
        assert rel < 1e-4, f"ours differs from diffusers (relative max difference {rel:.1e}):\n{row}"
    flop = re.search(r"([0-9.]+) GFLOP: ours [0-9.]+ TFLOP/s, diffusers [0-9.]+ TFLOP/s", r.stdout)
    assert flop and float(flop.group(1)) > 0, r.stdout  # the training step's FLOPs, counted
