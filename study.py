"""
The paper's comparison in one command (MagiCapture, AAAI 2024, Table 1: against Textual Inversion, DreamBooth and
Custom Diffusion; Table 3: the ablations and post-processing): every config trained on every (source, reference)
pair by train.py, all runs scored by one eval.py call, the scores pooled per method.

    python study.py --pairs=data/me:data/passport,data/me:data/wedding
    python study.py --pairs=... --step_scale=0.1              # a quick trial: each phase a tenth as long
    python study.py config/study_tiny.py                      # the whole grid on the tiny pipeline, on a CPU

pairs: comma-separated source_dir:reference_dir, each optionally named, name=source_dir:reference_dir (by default
the two folders' names joined by "_", so data/me:data/passport is me_passport). Each run goes to
<out_dir>/<config file's name>/<pair name>, its output to train.out there.

Run the same command again after a stop or a crash: a finished run is kept, an interrupted one resumed from its
last checkpoint, and eval.py scores again the images it drew before without drawing them. A run counts as
finished when its learned_embeds.safetensors and loss.png exist and its log reached phase1_steps + phase2_steps; a
folder holding a run of other settings or photos is reported and left alone (plan() below), so train with other
settings in another out_dir.

Writes <out_dir>/study.md (our scores beside the paper's), study.json (the same, with each run), study.png (one
row per method, one column per pair: each run's first evaluation image), eval.out and eval.md (eval.py's output
and table).
"""

import ast
import datetime
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

import data
import lora
from configurator import configure

# -----------------------------------------------------------------------------
pairs = "data/source:data/reference"  # comma-separated [name=]source_dir:reference_dir
configs = ("config/portrait.py,config/baseline_ti.py,config/baseline_dreambooth.py,"
           "config/baseline_custom_diffusion.py,config/ablation_no_ar.py,config/ablation_no_cp.py,"
           "config/ablation_no_ar_cp.py")  # comma-separated train.py config files: one method each
out_dir = "out/study"
train_args = ""          # more settings for every train.py call, as on a command line: "--device=cpu --dtype=fp32"
eval_args = ""           # the same for the eval.py call: "--num_images=8 --clip_model=DIR"
step_scale = 1.0         # each phase of N > 0 steps trains max(1, round(N * step_scale)), for quick trials
evaluate = True          # False: only train; the tables read the eval.json files the runs already hold
postprocess = True       # eval.py also scores each image after post-processing (the paper's Table 3)
# -----------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
METRICS = ("csim", "style", "aesthetic")  # eval.json's names; the paper's CSIM, Style, Aesthetic
KINDS = {"plain": "", "enhanced": " + post-processing"}  # eval.json's parts and the suffix of their rows
# The paper's numbers (Table 1 and Table 3: 10 identities x 10 styles, 100 images per pair), by the name of the
# config file that trains the method here; w/o AR alone (config/ablation_no_ar.py) has none here.
PAPER = {
    "baseline_dreambooth": dict(method="DreamBooth", csim=0.102, style=0.720, aesthetic=5.770),
    "baseline_ti": dict(method="Textual Inversion", csim=0.224, style=0.623, aesthetic=5.670),
    "baseline_custom_diffusion": dict(method="Custom Diffusion", csim=0.436, style=0.606, aesthetic=5.263),
    "ablation_no_ar_cp": dict(method="MagiCapture w/o AR & CP", csim=0.429, style=0.726, aesthetic=6.178),
    "ablation_no_cp": dict(method="MagiCapture w/o CP", csim=0.429, style=0.717, aesthetic=6.159),
    "portrait": dict(method="MagiCapture", csim=0.566, style=0.730, aesthetic=6.218),
    "portrait + post-processing": dict(method="MagiCapture + post-processing", csim=0.508, style=0.737,
                                       aesthetic=6.184),
}


@dataclass
class Pair:
    name: str
    source_dir: str
    reference_dir: str


@dataclass(eq=False)  # a run is itself, a key of the scores by identity
class Run:
    config: str        # the config file
    method: str        # its name without .py: the table's row
    pair: Pair
    folder: str        # <out_dir>/<method>/<pair name>: train.py's out_dir
    phase1_steps: int  # scaled by step_scale
    phase2_steps: int
    settings: dict     # every train.py setting the study trains it with (its config.json once trained)
    failed: str = ""   # why it did not finish: the command and the tail of its output


def parse_pairs(text):
    """'[name=]source:reference,...' -> [Pair]; SystemExit naming the entry when one is malformed or two share a name."""
    found = []
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        name, _, dirs = entry.rpartition("=")
        source, colon, reference = dirs.partition(":")
        if not (colon and source and reference) or ":" in reference or "/" in name:
            raise SystemExit(f"pairs: {entry!r} is not [name=]source_dir:reference_dir (one ':' between the two "
                             "folders; a name without '/'), e.g. --pairs=data/me:data/passport,wed=data/me:data/wedding")
        name = name or f"{os.path.basename(os.path.normpath(source))}_{os.path.basename(os.path.normpath(reference))}"
        found.append(Pair(name, source, reference))
    names = [p.name for p in found]
    if not found or len(set(names)) < len(names):
        raise SystemExit(f"pairs: {'no pair given' if not found else f'two pairs are named alike ({names})'}; give "
                         "each pair its own name: --pairs=a=data/me:data/x,b=data/you:data/x")
    return found


def train_settings(config, args):
    """The effective settings of `python train.py config args` as its --help prints them (`  name = value`), so the
    configurator resolves them, not a copy of it -> {name: value}, or SystemExit with train.py's message."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), config, *args, "--help"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"python train.py {config} {shlex.join(args)} --help failed:\n{r.stderr.strip()}")
    found = re.findall(r"^  (\w+) = (.*?)(?:    \(default .*\))?$", r.stdout, re.MULTILINE)
    return {k: ast.literal_eval(v) for k, v in found}


def scaled(steps):
    return max(1, round(steps * step_scale)) if steps > 0 else 0


def last_logged_step(folder):
    """The step of log.jsonl's last line, or None without a readable one."""
    try:
        with open(os.path.join(folder, "log.jsonl")) as f:
            lines = [l for l in f if l.strip()]
        return json.loads(lines[-1])["step"] if lines else None
    except (OSError, ValueError, KeyError):  # no log, or a line cut short by a crash
        return None


# settings a run's config.json may hold otherwise than this call would train it: where it is and the machine's own
MACHINE = ("out_dir", "resume", "overwrite", "device", "dtype")


def plan(run):
    """What run.folder asks of train.py -> (action, why). action: "new" (no run there), "finished" (its outputs,
    loss.png written last, and a log that reached phase1 + phase2 steps), "other" (a run of other settings, other
    photos or other phase lengths: neither finished nor to be resumed, and not deleted either), "resume"
    (interrupted, with a checkpoint), "overwrite" (an unfinished run without a checkpoint: train.py refuses to
    start over it unless told)."""
    held = [n for n in ("log.jsonl", lora.EMBEDS_FILE, lora.LORA_FILE) if os.path.exists(os.path.join(run.folder, n))]
    checkpoints = glob.glob(os.path.join(run.folder, "checkpoints", "step*.pt"))
    if not held and not checkpoints:
        return "new", ""
    try:
        with open(os.path.join(run.folder, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        cfg = {}
    changed = [f"{k}: {json.dumps(cfg[k])} -> {json.dumps(v)}" for k, v in run.settings.items()
               if k not in MACHINE and k in cfg and json.dumps(cfg[k]) != json.dumps(v)]
    if changed:
        return "other", (f"it holds a run of other settings (the run's -> the study's: {'; '.join(changed)}): delete "
                         "the folder to train it anew, or give the study another out_dir")
    done = lora.EMBEDS_FILE in held and os.path.exists(os.path.join(run.folder, "loss.png"))  # train.py's last
    if done and last_logged_step(run.folder) == run.phase1_steps + run.phase2_steps:
        return "finished", ""
    if checkpoints:
        return "resume", f"interrupted: resuming from {os.path.basename(max(checkpoints))}"
    return "overwrite", f"it holds an unfinished run ({', '.join(held)}) without a checkpoint: starting over"


def sigterm_as_ctrl_c(signum, frame):
    """SIGTERM to the process group (SLURM's scancel, `timeout`) reaches train.py too, which stops after its step
    with a checkpoint: the study takes it as Ctrl-C, reading the child's output until it has, then stops."""
    raise KeyboardInterrupt


def run_logged(cmd, path):
    """Run cmd, its output (progress bars too) passed through to ours and copied to `path` -> its exit status.
    Ctrl-C reaches the child as well (one process group): let it write its checkpoint, then stop the study."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # its prints in order with its progress bars
    sys.stdout.flush()  # ours first: the child's bytes go straight to the buffer below
    interrupted = False
    with open(path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        while True:
            try:
                chunk = os.read(proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    break
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                log.write(chunk)
            except KeyboardInterrupt:
                interrupted = True
        status = proc.wait()
    if interrupted:
        raise SystemExit(f"stopped ({path} has the run's last words); run the same command again to carry on")
    return status


def tail(path, lines=15):
    """The last lines of a file as a terminal shows them: each progress bar's last state only."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 20000))
        text = f.read().decode(errors="replace")
    return "\n".join(l.split("\r")[-1] for l in text.split("\n")[-lines:]).strip()


def elapsed(t0):
    return str(datetime.timedelta(seconds=int(time.time() - t0)))


def read_eval(run):
    """run's eval/eval.json, or None when it has none, one older than its weights (scored before a retraining), or
    one whose images are gone (an evaluation that failed while drawing anew)."""
    path = os.path.join(run.folder, "eval", "eval.json")
    weights = os.path.join(run.folder, lora.EMBEDS_FILE)
    if not os.path.isfile(path) or not os.path.isfile(weights) or os.path.getmtime(path) < os.path.getmtime(weights):
        return None
    with open(path) as f:
        result = json.load(f)
    files = [im["file"] for kind in KINDS if kind in result for im in result[kind]["images"]]
    return result if all(os.path.isfile(os.path.join(run.folder, "eval", f)) for f in files) else None


def pooled(method, config, kind, scored):
    """One table row: the per-image scores of every run in `scored` ({run: eval.json}) pooled over the pairs,
    mean and std (population, as eval.py) of each metric, and the images in which no face was found."""
    parts = {run: result[kind] for run, result in scored.items() if kind in result}
    images = [im for part in parts.values() for im in part["images"]]
    row = dict(method=method + KINDS[kind], config=config, pairs=len(parts), images=len(images),
               faces_not_found=sum(not im["face_found"] for im in images),
               runs=[run.folder for run in parts])
    for m in METRICS:
        values = [im[m] for im in images]
        row[m] = dict(mean=float(np.mean(values)), std=float(np.std(values))) if values else None
    first = {run.pair.name: os.path.join(run.folder, "eval", part["images"][0]["file"]) for run, part in parts.items()}
    return row, first


def markdown(rows, failed, pair_list, sheet, eval_failed=""):
    """study.md: our table, the paper's, the contact sheet if there is one (sheet), the runs that failed, and
    whether the evaluation failed (the scores are then earlier evaluations')."""
    def cell(v, fmt):
        return "—" if v is None else fmt(v)
    ours = ["| method | CSIM | Style | Aesthetic | pairs | no face |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [cell(r[m], lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}") for m in METRICS]
        no_face = f"{r['faces_not_found']} of {r['images']}" if r["images"] else "not evaluated"
        ours.append(f"| {r['method']} | {' | '.join(cells)} | {r['pairs']} | {no_face} |")
    paper = ["| method | the paper's method | CSIM | Style | Aesthetic |", "|---|---|---|---|---|"]
    for r in rows:
        p = PAPER.get(r["method"], dict(method="—"))
        paper.append(f"| {r['method']} | {p['method']} | " + " | ".join(cell(p.get(m), lambda v: f"{v:.3f}")
                                                                       for m in METRICS) + " |")
    text = (f"# Study: {len(rows)} methods, {len(pair_list)} pair{'s' * (len(pair_list) > 1)}\n\n"
            "Each method's CSIM, Style and Aesthetic as mean ± std over all images of all its pairs (eval.py's "
            "per-image scores, pooled); pairs: how many were scored; no face: images in which no face was found "
            "(CSIM 0).\n\n"
            + ("**The evaluation of this call failed** (below): the scores are those of earlier evaluations, where "
               "there were any, not of this call's settings.\n\n" if eval_failed else "")
            + "\n".join(ours) + "\n\n"
            "The paper's numbers (MagiCapture, AAAI 2024, Tables 1 and 3; 10 identities x 10 styles, 100 images "
            "per pair), for scale:\n\n" + "\n".join(paper) + "\n")
    if sheet:
        text += ("\n![first image of each run](study.png)\n\nstudy.png: one row per method, one column per pair: "
                 + ", ".join(f"{p.name} ({p.source_dir}, {p.reference_dir})" for p in pair_list) + ".\n")
    if failed:
        text += "\n## Failed runs\n\n" + "\n\n".join(f"{run.folder}:\n\n```\n{run.failed}\n```" for run in failed) + "\n"
    if eval_failed:
        text += f"\n## Failed evaluation\n\n```\n{eval_failed}\n```\n"
    return text


def contact_sheet(rows, firsts, pair_list, path):
    """One row per method with images, one column per pair, each cell that run's first image (white where there is
    none), all at the size of the first one found. Returns False, and removes an older sheet, when no run has an image."""
    shown = [(r, f) for r, f in zip(rows, firsts) if f]
    if not shown:
        if os.path.exists(path):
            os.remove(path)
        return False
    size = Image.open(next(iter(shown[0][1].values()))).size
    tiles = [data.to_tensor(data.read_rgb(f[p.name]).resize(size)) if p.name in f else torch.ones(3, size[1], size[0])
             for _, f in shown for p in pair_list]
    data.save_labeled_grid(torch.stack(tiles), len(pair_list), [r["method"] for r, _ in shown], path)
    return True


if __name__ == "__main__":
    config = configure(globals())
    signal.signal(signal.SIGTERM, sigterm_as_ctrl_c)
    if step_scale <= 0:
        raise SystemExit(f"step_scale must be > 0, got {step_scale}")
    pair_list = parse_pairs(pairs)
    config_list = [c.strip() for c in configs.split(",") if c.strip()]
    missing = [c for c in config_list if not os.path.isfile(c)]
    if missing or not config_list:
        raise SystemExit(f"configs: {', '.join(missing) or 'none given'}: give train.py config files, comma-separated")
    methods = {c: os.path.splitext(os.path.basename(c))[0] for c in config_list}  # a method's name is its file's
    if len(set(methods.values())) < len(config_list):
        raise SystemExit(f"configs: two files of one name ({', '.join(config_list)}): their runs would share a folder; "
                         "rename one")
    extra_train, extra_eval = shlex.split(train_args), shlex.split(eval_args)
    t0 = time.time()

    runs = []
    for c in config_list:  # each config's settings as train.py resolves them
        settings = train_settings(c, extra_train)
        steps = scaled(settings["phase1_steps"]), scaled(settings["phase2_steps"])
        runs += [Run(c, methods[c], p, os.path.join(out_dir, methods[c], p.name), *steps,
                     dict(settings, phase1_steps=steps[0], phase2_steps=steps[1], source_dir=p.source_dir,
                          reference_dir=p.reference_dir)) for p in pair_list]
    print(f"{len(runs)} runs ({len(config_list)} configs x {len(pair_list)} pairs) in {out_dir}")

    for i, run in enumerate(runs, 1):
        action, why = plan(run)
        head = f"[{i}/{len(runs)} {elapsed(t0)}] {run.method} on {run.pair.name} " \
               f"({run.phase1_steps} + {run.phase2_steps} steps)"
        if action == "finished":
            print(f"{head}: finished, kept")
            continue
        if action == "other":
            run.failed = f"{run.folder}: {why}"
            print(f"{head}: not trained; {run.failed}", file=sys.stderr)
            continue
        print(f"{head}: training" + (f"; {run.folder}: {why}" if why else ""), flush=True)
        flag = {"new": [], "resume": ["--resume"], "overwrite": ["--overwrite"]}[action]
        cmd = [sys.executable, os.path.join(HERE, "train.py"), run.config, f"--source_dir={run.pair.source_dir}",
               f"--reference_dir={run.pair.reference_dir}", f"--out_dir={run.folder}", *extra_train,
               f"--phase1_steps={run.phase1_steps}", f"--phase2_steps={run.phase2_steps}", *flag]
        os.makedirs(run.folder, exist_ok=True)
        out = os.path.join(run.folder, "train.out")
        if run_logged(cmd, out) != 0 or plan(run)[0] != "finished":
            run.failed = f"$ {shlex.join(cmd)}\n{tail(out)}"
            print(f"[{i}/{len(runs)} {elapsed(t0)}] {run.method} on {run.pair.name} FAILED; the study goes on with "
                  f"the others. Its output is in {out}", file=sys.stderr)

    finished = [run for run in runs if not run.failed]
    eval_failed = ""
    if evaluate and finished:
        print(f"[{elapsed(t0)}] evaluating {len(finished)} runs", flush=True)
        cmd = [sys.executable, os.path.join(HERE, "eval.py"), f"--runs={','.join(r.folder for r in finished)}",
               f"--table_file={os.path.join(out_dir, 'eval.md')}", f"--postprocess={postprocess}", *extra_eval]
        out = os.path.join(out_dir, "eval.out")
        if run_logged(cmd, out) != 0:
            eval_failed = f"$ {shlex.join(cmd)}\n{tail(out)}"
            print(f"evaluation FAILED; the tables hold what the runs' eval.json files held before. Its output "
                  f"is in {out}", file=sys.stderr)

    scored = {run: read_eval(run) for run in finished}
    scored = {run: result for run, result in scored.items() if result is not None}
    rows, firsts = [], []
    for c in config_list:
        mine = {run: result for run, result in scored.items() if run.config == c}
        for kind in KINDS:
            if kind == "plain" or any(kind in result for result in mine.values()):
                row, first = pooled(methods[c], c, kind, mine)
                rows.append(row)
                firsts.append(first)
    failed = [run for run in runs if run.failed]
    unscored = [run.folder for run in finished if run not in scored]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "study.json"), "w") as f:
        json.dump(dict(settings=config, pairs=[vars(p) for p in pair_list], methods=rows,
                       paper={r["method"]: PAPER[r["method"]] for r in rows if r["method"] in PAPER},
                       failed=[dict(run=r.folder, config=r.config, pair=r.pair.name, output=r.failed) for r in failed],
                       not_evaluated=unscored, evaluation_failed=eval_failed), f, indent=2)
    sheet = contact_sheet(rows, firsts, pair_list, os.path.join(out_dir, "study.png"))
    text = markdown(rows, failed, pair_list, sheet, eval_failed)
    with open(os.path.join(out_dir, "study.md"), "w") as f:
        f.write(text)
    print("\n" + text)
    if unscored:
        print(f"not evaluated (no eval/eval.json newer than the run's weights): {', '.join(unscored)}"
              + ("" if evaluate else "; evaluate=False"))
    print(f"[{elapsed(t0)}] wrote {out_dir}/study.md, study.json" + (", study.png" if sheet else " (no image for study.png)"))
    for run in failed:
        print(f"\nFAILED {run.folder}:\n{run.failed}", file=sys.stderr)
    if eval_failed:
        print(f"\nFAILED evaluation:\n{eval_failed}", file=sys.stderr)
    if failed or eval_failed:
        raise SystemExit(f"{len(failed)} of {len(runs)} runs failed" + ("; the evaluation failed" if eval_failed else ""))
