"""study.py on a tiny grid (MagiCapture and Textual Inversion, one pair, stand-in face models, the tiny CLIP tower):
its tables and contact sheet, a second call that only scores, an interrupted run resumed, a failed run reported.
Run: python -m pytest -q tests/test_study.py"""
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import standins
import study
from test_eval import env  # noqa: F401 (a fixture: tiny pipeline and CLIP tower, stand-in face models, data, predictor)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = "config/baseline_ti.py,config/portrait.py"
# step_scale 0.0004: Textual Inversion 5000 + 0 -> 2 + 0 steps, MagiCapture 1200 + 1500 -> 1 + 1 (at least 1 each)
TRAIN = ("--init_from=tiny --variant=None --resolution=64 --attn_resolutions=(4,) --eval_steps=2 --eval_interval=1000 "
         "--device=cpu --dtype=fp32 --lambda_id=0 --grad_accum=1 --ckpt_interval=1 --keep_checkpoints=2")


def call_study(env, out, *args):
    m = env["models"]
    post = env["root"] / "post"
    post.mkdir(exist_ok=True)
    eval_args = shlex.join(["--num_images=2", "--steps=2", "--batch_size=2", "--clip_model=tiny",
                            "--descriptions=('smiling',)", "--device=cpu", "--dtype=fp32",
                            f"--aesthetic_model={env['mlp']}", f"--detector_model={m['detector']}",
                            f"--recognizer_model={m['recognizer']}", f"--parser_model={m['parser']}",
                            f"--upscaler_model={standins.upscaler(str(post / 'up.onnx'))}",
                            f"--restorer_model={standins.restorer(str(post / 'cf.onnx'))}"])
    cmd = [sys.executable, "study.py", f"--pairs=drawn={env['root'] / 'src'}:{env['root'] / 'ref'}",
           f"--configs={CONFIGS}", f"--out_dir={out}", f"--train_args={TRAIN}", f"--eval_args={eval_args}",
           "--step_scale=0.0004", *args]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, XDG_CACHE_HOME=str(env["root"] / "xdg")),
                       capture_output=True, text=True)
    print(f"study.py {' '.join(args)}: {time.time() - t0:.1f} s")
    return r


@pytest.fixture(scope="module")
def grid(env):  # noqa: F811
    out = env["root"] / "study"
    r = call_study(env, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r


ROWS = ["baseline_ti", "baseline_ti + post-processing", "portrait", "portrait + post-processing"]


def test_tables_and_contact_sheet(grid):
    """study.json and study.md hold one row per method (post-processing rows too), each the per-image scores of
    eval.json pooled; the paper's numbers stand beside them; study.png has one 64 px row per method."""
    out, r = grid
    result = json.load(open(out / "study.json"))
    assert [m["method"] for m in result["methods"]] == ROWS
    for m in result["methods"]:
        part = "enhanced" if "post-processing" in m["method"] else "plain"
        images = json.load(open(out / m["method"].split(" ")[0] / "drawn" / "eval" / "eval.json"))[part]["images"]
        assert m["pairs"] == 1 and m["images"] == 2 and m["faces_not_found"] == 0, m
        for metric in study.METRICS:
            want = np.mean([im[metric] for im in images]), np.std([im[metric] for im in images])
            got = m[metric]["mean"], m[metric]["std"]
            assert np.allclose(got, want), f"{m['method']} {metric}: {got} pooled, eval.json {want}"
    assert result["paper"]["portrait"]["csim"] == 0.566 and result["paper"]["baseline_ti"]["style"] == 0.623
    lines = (out / "study.md").read_text().splitlines()
    ours = [l for l in lines if l.startswith("| ") and "±" in l]
    assert [l.split("|")[1].strip() for l in ours] == ROWS, ours
    assert "| portrait + post-processing | MagiCapture + post-processing | 0.508 | 0.737 | 6.184 |" in lines
    assert Image.open(out / "study.png").size == (64, 4 * (64 + 14))
    assert "[1/2" in r.stdout and "[2/2" in r.stdout and "evaluating 2 runs" in r.stdout
    logged = [json.loads(l)["step"] for l in open(out / "baseline_ti" / "drawn" / "log.jsonl")]
    assert logged[-1] == 2 and "2 + 0 steps" in r.stdout and "1 + 1 steps" in r.stdout, (logged, r.stdout[-2000:])


def test_second_call_only_scores(grid, env):  # noqa: F811
    """Called again, the study trains nothing (train.out untouched), eval.py reuses every image, the tables stay."""
    out, _ = grid
    before = {m: os.stat(out / m / "drawn" / "train.out").st_mtime_ns for m in ("baseline_ti", "portrait")}
    table = json.load(open(out / "study.json"))["methods"]
    r = call_study(env, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("finished, kept") == 2 and ": training" not in r.stdout, r.stdout[-2000:]
    assert r.stdout.count("scoring them again") == 2 and "drawing drawn" not in r.stdout, r.stdout[-2000:]
    assert {m: os.stat(out / m / "drawn" / "train.out").st_mtime_ns for m in before} == before
    assert json.load(open(out / "study.json"))["methods"] == table


def test_interrupted_run_is_resumed(grid, env):  # noqa: F811
    """A run whose last checkpoint and weights are gone is resumed from the checkpoint before, to the same weights."""
    out, _ = grid
    run = out / "portrait" / "drawn"
    weights = load_file(str(run / "learned_embeds.safetensors"))
    for name in ("checkpoints/step000002.pt", "learned_embeds.safetensors", "pytorch_lora_weights.safetensors",
                 "lora_kohya.safetensors"):
        os.remove(run / name)
    r = call_study(env, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "interrupted: resuming from step000001.pt" in r.stdout, r.stdout[-2000:]
    assert "at step 1" in (run / "train.out").read_text()
    again = load_file(str(run / "learned_embeds.safetensors"))
    for k in weights:
        assert torch.equal(again[k], weights[k]), f"{k}: max diff {(again[k] - weights[k]).abs().max()}"
    assert [json.loads(l)["step"] for l in open(run / "log.jsonl")] == [1, 2]
    assert r.stdout.count("finished, kept") == 1 and "| portrait | " in (out / "study.md").read_text()


def test_failed_run_is_reported(grid, env, tmp_path):  # noqa: F811
    """A run that fails is named with its command and output; the others still make the tables; exit status 1."""
    out, _ = grid
    bad = tmp_path / "bad.py"
    bad.write_text("min_mask_fraction = 0.7\n")  # train.py stops at its settings check
    r = call_study(env, out, f"--configs=config/baseline_ti.py,{bad}", "--evaluate=False")
    assert r.returncode == 1 and "1 of 2 runs failed" in r.stderr, r.stderr[-3000:]
    assert f"FAILED {out / 'bad' / 'drawn'}" in r.stderr and f"train.py {bad}" in r.stderr, r.stderr[-3000:]
    assert "min_mask_fraction must be in [0, 0.5)" in r.stderr, r.stderr[-3000:]
    text = (out / "study.md").read_text()
    assert "## Failed runs" in text and "| baseline_ti | " in text and "| bad | — | — | — | 0 | not evaluated |" in text


def test_pairs_and_plans(tmp_path):
    """Pair names (given or from the folders; alike ones refused) and what a folder asks of train.py."""
    got = study.parse_pairs("data/me:data/passport, wed=data/me:data/wedding")
    assert [(p.name, p.source_dir, p.reference_dir) for p in got] == \
        [("me_passport", "data/me", "data/passport"), ("wed", "data/me", "data/wedding")]
    for bad in ("data/me", "a/b:c/d,e/b:f/d", "x/y=a:b"):
        with pytest.raises(SystemExit, match="pairs"):
            study.parse_pairs(bad)
    settings = dict(phase1_steps=2, phase2_steps=3, lr_lora=1e-4, source_dir="data/me", device="cpu")
    run = study.Run("config/portrait.py", "portrait", got[0], str(tmp_path), 2, 3, settings)
    assert study.plan(run) == ("new", "")
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n')
    assert study.plan(run)[0] == "overwrite"  # a log, no checkpoint: train.py would refuse without --overwrite
    os.makedirs(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "step000001.pt").write_bytes(b"")
    assert study.plan(run) == ("resume", "interrupted: resuming from step000001.pt")
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n{"step": 5}\n')
    (tmp_path / "learned_embeds.safetensors").write_bytes(b"")
    assert study.plan(run)[0] == "resume"  # no loss.png: train.py died while writing its outputs
    (tmp_path / "loss.png").write_bytes(b"")
    assert study.plan(run)[0] == "finished"
    (tmp_path / "config.json").write_text(json.dumps(dict(settings, device="cuda", run_id="x")))  # the machine's own
    assert study.plan(run)[0] == "finished"
    (tmp_path / "config.json").write_text(json.dumps(dict(settings, phase1_steps=4, phase2_steps=1, lr_lora=1e-3,
                                                          source_dir="data/you")))  # 5 steps too, split otherwise
    action, why = study.plan(run)
    assert action == "other" and "another out_dir" in why, why
    assert "phase1_steps: 4 -> 2" in why and "lr_lora: 0.001 -> 0.0001" in why and 'source_dir: "data/you"' in why


def test_scores_of_vanished_images_and_a_failed_evaluation(tmp_path):
    """An eval.json whose images are gone (an evaluation that failed while drawing anew) is not read; a failed
    evaluation is said at the top of study.md."""
    pair = study.Pair("p", "s", "r")
    run = study.Run("config/portrait.py", "portrait", pair, str(tmp_path), 1, 1, {})
    (tmp_path / "learned_embeds.safetensors").write_bytes(b"")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "p0_seed0.png").write_bytes(b"")
    result = dict(plain=dict(images=[dict(file="p0_seed0.png")]))
    (tmp_path / "eval" / "eval.json").write_text(json.dumps(result))
    assert study.read_eval(run) == result
    os.remove(tmp_path / "eval" / "p0_seed0.png")
    assert study.read_eval(run) is None
    text = study.markdown([], [], [pair], None, eval_failed="$ python eval.py\nboom")
    assert "The evaluation of this call failed" in text and "## Failed evaluation" in text and "boom" in text
    assert "failed" not in study.markdown([], [], [pair], None)

def test_pooled_scores_every_image_of_every_pair():
    """A row's mean and std are over all images of all pairs (not the mean of each pair's), its face count summed."""
    scores = {"a": [0.1, 0.3], "b": [0.5, 0.5, 0.5, 0.9]}  # unequal counts and spreads: the two ways differ
    run = lambda name: study.Run("config/portrait.py", "portrait", study.Pair(name, "s", "r"), f"runs/{name}", 1, 1, {})
    scored = {run(name):
              {"plain": {"images": [dict(file=f"{i}.png", face_found=i > 0, csim=v, style=v, aesthetic=v)
                                    for i, v in enumerate(values)]}} for name, values in scores.items()}
    row, first = study.pooled("ours", "config/portrait.py", "plain", scored)
    every = scores["a"] + scores["b"]
    assert row["images"] == 6 and row["pairs"] == 2 and row["faces_not_found"] == 2
    for m in study.METRICS:
        assert np.isclose(row[m]["mean"], np.mean(every)) and np.isclose(row[m]["std"], np.std(every)), row[m]
    assert first == {"a": os.path.join("runs/a", "eval", "0.png"), "b": os.path.join("runs/b", "eval", "0.png")}


def test_sigterm_lets_the_run_write_its_checkpoint(tmp_path):
    """SIGTERM to the study's process group (scancel, timeout) reaches the training run too: the study keeps reading
    its output until the run has stopped with its checkpoint (a stand-in child here), then stops with a message."""
    import signal
    log = tmp_path / "run.log"
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.5), print('checkpoint written', flush=True), "
             "sys.exit(143)))\nprint('started', flush=True)\ntime.sleep(60)")
    parent = ("import signal, sys, study\nsignal.signal(signal.SIGTERM, study.sigterm_as_ctrl_c)\n"
              f"study.run_logged([sys.executable, '-c', {child!r}], {str(log)!r})")
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "started\n"  # passed through by the study as the run prints it
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert "checkpoint written" in log.read_text() and "stopped (" in err, (out, err)
