"""eval.py: the three metrics (CSIM, Style, Aesthetic) on stand-in face models and the tiny CLIP tower, the
aesthetic predictor's loading and file checks, and the script end to end on two tiny training runs.
Run: python -m pytest -q tests/test_eval.py"""
import json
import os
import re

import numpy as np
import pytest
from huggingface_hub import constants as hf_constants
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import data
import eval as ev
import faces
import lora
import standins
from conftest import hub_cache, run_script, stop_on_call
from model import CLIPVisionModel, StableDiffusion

# in the detector's 640x640 letterbox: a 256 px photo's face at x 80-160, y 72-172; a 64 px image's at 20-40, 18-43
FACE = dict(box=(200, 180, 400, 430), score=0.9,
            landmarks=[(250, 270), (350, 270), (300, 320), (260, 370), (340, 370)])
REPO, NAME = "sitatech/aesthetic-predictor-v2", "sac+logos+ava1-l14-linearMSE.pth"


def reference_mlp(dim):
    """LAION's predictor as its training code writes it: Linear and Dropout layers in one nn.Sequential."""
    return nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


def save_mlp(path, dim, seed=0):
    """A random predictor's state dict under LAION's keys (layers.N.weight) at `path`; returns the module."""
    torch.manual_seed(seed)
    mlp = reference_mlp(dim).eval()
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, path)
    return mlp


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """An XDG cache holding the tiny pipeline and CLIP tower (the tower loaded), stand-in face models, a synthetic
    data set (the runs' photos) and a random aesthetic predictor for the tiny tower."""
    root = tmp_path_factory.mktemp("eval")
    labels = np.zeros((512, 512), np.int64)
    labels[160:400, 140:370] = 1  # "skin" in the middle of the aligned 512 crop
    d = root / "faces"
    d.mkdir()
    models = dict(detector=standins.detector(str(d / "det.onnx"), [FACE]),
                  recognizer=standins.recognizer(str(d / "rec.onnx")),
                  parser=standins.parser(str(d / "par.onnx"), labels))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "xdg"))
        clip = CLIPVisionModel.from_pretrained("tiny")
        StableDiffusion.from_pretrained("tiny")  # builds it in the cache, for the runs and the script
    data.make_synthetic(str(root / "src"), str(root / "ref"), n=2)
    save_mlp(root / "mlp.pth", clip.config.projection_dim)  # random weights as wide as the tiny tower's embedding
    return dict(root=root, models=models, clip=clip, mlp=str(root / "mlp.pth"))


def photo(seed, size=256):
    """A random RGB image: bright pixels, so the stand-in detector finds its face."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_csim_of_an_image_with_itself_is_one(env):
    """CSIM of an image against its own identity target is 1; another image scores less; no face scores 0."""
    m = env["models"]
    image = photo(0)
    target = ev.identity_target({"a.png": image}, m["detector"], m["recognizer"])
    face = ev.largest_face(image, m["detector"])
    same = ev.csim(image, face, target, m["recognizer"])
    assert abs(same - 1) < 1e-4, f"CSIM with itself {same}"
    other = photo(1)
    assert ev.csim(other, ev.largest_face(other, m["detector"]), target, m["recognizer"]) < 1 - 1e-3
    dark = np.full((256, 256, 3), 40, np.uint8)  # the stand-in detector finds nothing in a dark image
    assert ev.largest_face(dark, m["detector"]) is None and ev.csim(dark, None, target) == 0.0
    with pytest.raises(ValueError, match="dark.png"):
        ev.identity_target({"a.png": image, "dark.png": dark}, m["detector"], m["recognizer"])


def test_style_ignores_the_face_region(env):
    """The Style score does not move when only pixels inside the face mask change, moves when pixels outside
    it change, and compares the whole image when no face is found."""
    m, clip = env["models"], env["clip"]
    ref = photo(2)
    references = ev.clip_embed(clip, [ev.without_face(ref, ev.largest_face(ref, m["detector"]), m["parser"])])
    image = photo(3, size=64)
    face = ev.largest_face(image, m["detector"])
    region = faces.face_mask(image, face, m["parser"]) > 0.5
    assert 100 < region.sum() < 0.5 * region.size, f"face region of {region.sum()} pixels"
    base = ev.style(image, face, references, clip, m["parser"])
    rng = np.random.default_rng(4)
    inside, outside = image.copy(), image.copy()
    inside[region] = rng.integers(0, 256, (region.sum(), 3))
    outside[~region] = rng.integers(0, 256, ((~region).sum(), 3))
    d_in = abs(ev.style(inside, face, references, clip, m["parser"]) - base)
    d_out = abs(ev.style(outside, face, references, clip, m["parser"]) - base)
    assert d_in == 0 and d_out > 1e-4, f"change inside the face moved Style by {d_in}, outside by {d_out}"
    whole = float(ev.clip_embed(clip, [image]) @ references[0])
    assert abs(ev.style(image, None, references, clip, m["parser"]) - whole) < 1e-6


def test_images_without_a_face_score_zero_and_are_counted(env):
    """score_images: an image without a face gets CSIM 0 and face_found False; summary counts it."""
    m, clip = env["models"], env["clip"]
    ref = photo(2)
    references = ev.clip_embed(clip, [ev.without_face(ref, ev.largest_face(ref, m["detector"]), m["parser"])])
    target = ev.identity_target({"a.png": ref}, m["detector"], m["recognizer"])
    dark = np.full((64, 64, 3), 40, np.uint8)
    records = ev.score_images([photo(5, size=64), dark], target, references, clip, ev.load_aesthetic(env["mlp"]), m)
    assert [r["face_found"] for r in records] == [True, False] and records[1]["csim"] == 0.0, records
    s = ev.summary(records)
    assert s["faces_not_found"] == 1 and abs(s["csim"]["mean"] - records[0]["csim"] / 2) < 1e-9, s


def test_aesthetic_predictor_matches_laion_mlp(tmp_path):
    """Loaded through load_aesthetic, the predictor equals LAION's nn.Sequential (dropouts included, eval mode)
    on normalised embeddings; a .pth holding anything but tensors is refused, never unpickled."""
    path = str(tmp_path / "mlp.pth")
    reference = save_mlp(path, 768)
    predictor = ev.load_aesthetic(ev.aesthetic_weights(path, REPO, NAME))
    x = torch.randn(5, 768, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        want = reference(F.normalize(x, dim=-1)).squeeze(-1)
    err = (predictor(x) - want).abs().max().item()
    assert err < 1e-6, f"max abs difference {err:.2e}"
    torch.save({"layers.0.weight": torch.zeros(1), "code": Image.new("RGB", (1, 1))}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth: not a state dict of tensors"):
        ev.load_aesthetic(str(tmp_path / "bad.pth"))


def test_aesthetic_file_md5_and_offline(tmp_path, monkeypatch):
    """A cached Hub copy whose MD5 is not the published one is refused (naming the file and the fix); one that
    matches is used without the network; offline with nothing cached: one MissingModel with the hf command."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # any network use would raise MissingModel
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(faces.MissingModel, match=re.escape(f"`hf download {REPO} {NAME} --local-dir DIR`")):
        ev.aesthetic_weights("", REPO, NAME)
    save_mlp(tmp_path / "mlp.pth", 8)
    content = (tmp_path / "mlp.pth").read_bytes()
    snapshot = hub_cache(tmp_path / "hub", REPO, {NAME: content})
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(RuntimeError, match=f"(?s){re.escape(NAME)}: MD5 .*{ev.AESTHETIC_MD5}.*--aesthetic_model"):
        ev.aesthetic_weights("", REPO, NAME)
    md5 = ev.file_digest([tmp_path / "mlp.pth"], "md5")
    assert ev.aesthetic_weights("", REPO, NAME, md5=md5) == str(snapshot / NAME)


def make_run(env, name, seed):
    """A training run's folder without train.py: random tokens and LoRA on the tiny pipeline, and the
    config.json entries eval.py reads."""
    out = env["root"] / name
    sd = StableDiffusion.from_pretrained(str(env["root"] / "xdg" / "magicapture" / "tiny-sd"))
    g = torch.Generator().manual_seed(seed)
    width = sd.text_encoder.text_model.embeddings.token_embedding.embedding_dim
    lora.inject(sd.unet, lora.PAPER_UNET, rank=4, generator=g)
    with torch.no_grad():
        for p in lora.lora_parameters(sd.unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lora.save_result(str(out), sd.unet, None, {t: torch.randn(width, generator=g) for t in ("<v1>", "<v2>")}, {})
    with open(out / "config.json", "w") as f:
        json.dump(dict(init_from="tiny", variant=None, tokens=["<v1>", "<v2>"], resolution=64,
                       composed_templates=["a photo of {} person in the {} style"],
                       source_dir=str(env["root"] / "src"), reference_dir=str(env["root"] / "ref")), f)
    return out


def run_eval(env, *args):
    m = env["models"]
    return run_script("eval.py", "--num_images=2", "--steps=2", "--batch_size=2", "--clip_model=tiny",
                      "--descriptions=('smiling',)", "--device=cpu", "--dtype=fp32", f"--aesthetic_model={env['mlp']}",
                      f"--detector_model={m['detector']}", f"--recognizer_model={m['recognizer']}",
                      f"--parser_model={m['parser']}", *args, cache=env["root"] / "xdg")


def test_eval_end_to_end(env, tmp_path):
    """Two runs, with post-processing: eval.json with sane scores, contact sheets, a table of 4 rows in eval.md;
    a second call reuses the images (same files, untouched) and gives the same scores."""
    d = tmp_path / "post"
    d.mkdir()
    post = [f"--upscaler_model={standins.upscaler(str(d / 'up.onnx'))}",
            f"--restorer_model={standins.restorer(str(d / 'cf.onnx'))}", "--postprocess"]
    runs = [make_run(env, "run_a", 0), make_run(env, "run_b", 1)]
    table = tmp_path / "eval.md"
    args = [f"--runs={runs[0]},{runs[1]}", f"--table_file={table}", *post]
    r = run_eval(env, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    first = {}
    for run in runs:
        result = json.load(open(run / "eval" / "eval.json"))
        for kind, size in (("plain", 64), ("enhanced", 128)):
            s = result[kind]
            assert len(s["images"]) == 2 and s["faces_not_found"] == 0, s
            for im in s["images"]:
                assert -1 <= im["csim"] <= 1 and -1 <= im["style"] <= 1 and np.isfinite(im["aesthetic"]), im
                assert Image.open(run / "eval" / im["file"]).size == (size, size)
            assert abs(s["csim"]["mean"] - np.mean([im["csim"] for im in s["images"]])) < 1e-9
            assert s["style"]["std"] >= 0
        assert [im["prompt"] for im in result["plain"]["images"]] == [0, 1]
        assert result["prompts"][1] == "a photo of <v1> person in the <v2> style, smiling"
        # one row per prompt, one image each, a 14 px caption above each row
        assert Image.open(run / "eval" / "sheet.png").size == (64, 2 * (64 + 14))
        assert Image.open(run / "eval" / "sheet_enhanced.png").size == (128, 2 * (128 + 14))
        first[run] = {f: os.stat(run / "eval" / f).st_mtime_ns for f in os.listdir(run / "eval") if f.endswith(".png")
                      and not f.startswith("sheet")}
    rows = table.read_text().strip().splitlines()
    assert [row.split("|")[1].strip() for row in rows[2:]] == \
        ["run_a", "run_a + postprocessing", "run_b", "run_b + postprocessing"], rows
    assert "±" in rows[2] and r.stdout.count("| run_") == 4

    r = run_eval(env, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("scoring them again") == 2 and "drawing" not in r.stderr, r.stdout + r.stderr[-2000:]
    for run in runs:
        again = {f: os.stat(run / "eval" / f).st_mtime_ns for f in first[run]}
        assert again == first[run], "a second call with the same settings drew its images again"
    assert table.read_text().strip().splitlines() == rows, "same images, different scores"

    # the official script's post-processing: the plain images kept, the enhanced ones made again, no upscaler file
    r = run_eval(env, f"--runs={runs[0]}", f"--table_file={table}", post[1], "--postprocess", "--upsampler=bilinear")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "scoring them again" in r.stdout and r.stdout.count("(bilinear)") == 2, r.stdout
    assert {f: os.stat(runs[0] / "eval" / f).st_mtime_ns for f in first[runs[0]] if "enhanced" not in f} == \
        {f: t for f, t in first[runs[0]].items() if "enhanced" not in f}
    assert Image.open(runs[0] / "eval" / "p0_seed0_enhanced.png").size == (128, 128)

    r = run_eval(env, f"--runs={runs[0]}", f"--table_file={table}", "--steps=3")  # another setting: drawn anew
    assert r.returncode == 0, r.stderr[-3000:]
    assert "scoring them again" not in r.stdout and "drawing run_a" in r.stderr, r.stdout
    left = sorted(f for f in os.listdir(runs[0] / "eval") if f.startswith("p"))
    assert left == ["p0_seed0.png", "p1_seed1.png"], f"images of other settings left behind: {left}"
    assert os.stat(runs[0] / "eval" / "p0_seed0.png").st_mtime_ns != first[runs[0]]["p0_seed0.png"]


def test_a_stopped_draw_goes_on(env, tmp_path, monkeypatch):
    """A draw stopped after its first image keeps it: the next call draws only the second, and both equal the
    images of a draw that was never stopped."""
    a, b = make_run(env, "run_stopped", 0), make_run(env, "run_whole", 0)  # the same tokens and LoRA
    real = StableDiffusion.sample
    monkeypatch.setattr(StableDiffusion, "sample", stop_on_call(real, 2))
    with pytest.raises(KeyboardInterrupt):
        run_eval(env, f"--runs={a}", "--batch_size=1", f"--table_file={tmp_path / 'a.md'}")
    assert sorted(f for f in os.listdir(a / "eval") if f.endswith(".png")) == ["p0_seed0.png"]
    monkeypatch.setattr(StableDiffusion, "sample", real)
    kept = os.stat(a / "eval" / "p0_seed0.png").st_mtime_ns
    r = run_eval(env, f"--runs={a}", "--batch_size=1", f"--table_file={tmp_path / 'a.md'}")
    assert r.returncode == 0 and "1 of the 2 images were drawn before a stop" in r.stdout, r.stdout + r.stderr[-2000:]
    assert os.stat(a / "eval" / "p0_seed0.png").st_mtime_ns == kept
    r = run_eval(env, f"--runs={b}", "--batch_size=1", f"--table_file={tmp_path / 'b.md'}")
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("p0_seed0.png", "p1_seed1.png"):
        assert np.array_equal(np.asarray(Image.open(a / "eval" / f)), np.asarray(Image.open(b / "eval" / f))), f


def test_a_stopped_postprocessing_goes_on(env, tmp_path, monkeypatch):
    """Post-processing stopped after its first image keeps that image: the next call makes only the second."""
    import postprocess
    d = tmp_path / "post"
    d.mkdir()
    post = [f"--upscaler_model={standins.upscaler(str(d / 'up.onnx'))}",
            f"--restorer_model={standins.restorer(str(d / 'cf.onnx'))}", "--postprocess"]
    run = make_run(env, "run_post", 0)
    real, calls = postprocess.enhance, []
    monkeypatch.setattr(postprocess, "enhance", stop_on_call(real, 2))
    with pytest.raises(KeyboardInterrupt):
        run_eval(env, f"--runs={run}", f"--table_file={tmp_path / 'a.md'}", *post)
    assert sorted(f for f in os.listdir(run / "eval") if f.endswith("_enhanced.png")) == ["p0_seed0_enhanced.png"]
    kept = os.stat(run / "eval" / "p0_seed0_enhanced.png").st_mtime_ns
    monkeypatch.setattr(postprocess, "enhance", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    r = run_eval(env, f"--runs={run}", f"--table_file={tmp_path / 'a.md'}", *post)
    assert r.returncode == 0 and len(calls) == 1, r.stderr[-2000:]
    assert os.stat(run / "eval" / "p0_seed0_enhanced.png").st_mtime_ns == kept
    assert Image.open(run / "eval" / "p1_seed1_enhanced.png").size == (128, 128)

def test_bad_runs_are_named(env, tmp_path):
    """A folder without config.json, or with it but without the run's weights, stops before any model loads."""
    (tmp_path / "empty").mkdir()
    r = run_eval(env, f"--runs={tmp_path / 'empty'}")
    assert r.returncode != 0 and f"{tmp_path / 'empty' / 'config.json'} not found" in r.stderr, r.stderr[-2000:]
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text("{}")
    r = run_eval(env, f"--runs={tmp_path / 'unfinished'}")
    assert r.returncode != 0 and f"has no {lora.EMBEDS_FILE}" in r.stderr and "Traceback" not in r.stderr, \
        r.stderr[-2000:]
    # a run whose base model is neither cached nor reachable, listed after a good one: stopped before any drawing
    good, hub = make_run(env, "run_good_hub", 0), make_run(env, "run_hub", 1)
    cfg = json.load(open(hub / "config.json"))
    json.dump(dict(cfg, init_from="someone/uncached-model"), open(hub / "config.json", "w"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        mp.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
        r = run_eval(env, f"--runs={good},{hub}", f"--table_file={tmp_path / 'eval.md'}")
    assert r.returncode != 0 and "someone/uncached-model" in r.stderr and "hf download" in r.stderr, r.stderr[-2000:]
    assert not (good / "eval").exists()
    # photos other than those the run trained on (train.py records their SHA-256 in config.json): refused
    other = make_run(env, "run_other_photos", 0)
    cfg = json.load(open(other / "config.json"))
    photos = data.digests({k: [p for p, _ in data.list_images(cfg[f"{k}_dir"])] for k in ("source", "reference")})
    first = sorted(photos)[0]
    json.dump(dict(cfg, photos=dict(photos, **{first: "0" * 64})), open(other / "config.json", "w"))
    r = run_eval(env, f"--runs={other}", f"--table_file={tmp_path / 'eval.md'}")
    assert r.returncode != 0 and f"differ from those it trained on (config.json):\n  {first}: changed" in r.stderr, \
        r.stderr[-2000:]
    json.dump(dict(cfg, photos=photos), open(other / "config.json", "w"))
    r = run_eval(env, f"--runs={other}", f"--table_file={tmp_path / 'eval.md'}")
    assert r.returncode == 0, r.stderr[-2000:]


def test_faceless_sources_stop_before_drawing(env, tmp_path):
    """A run whose source photos have no face stops, naming them, before the first image of any run is drawn."""
    from PIL import Image
    good, bad = make_run(env, "run_good", 0), make_run(env, "run_faceless", 1)
    (tmp_path / "dark").mkdir()
    for i in range(2):  # no pixel above 127: the stand-in detector finds no face
        Image.new("RGB", (64, 64), (20, 20, 20)).save(tmp_path / "dark" / f"{i}.png")
    cfg = json.load(open(bad / "config.json"))
    json.dump(dict(cfg, source_dir=str(tmp_path / "dark")), open(bad / "config.json", "w"))
    r = run_eval(env, f"--runs={good},{bad}", f"--table_file={tmp_path / 'eval.md'}")
    assert r.returncode != 0 and "no face found in the source" in r.stderr, r.stderr[-2000:]
    assert not (good / "eval").exists() and not (bad / "eval").exists()


def test_eval_config_parses(tmp_path):
    """config/eval.py type-checks against eval.py's settings."""
    r = run_script("eval.py", "config/eval.py", "--help", cache=tmp_path)
    assert r.returncode == 0 and "postprocess = True" in r.stdout, r.stderr[-2000:]


def test_run_names_tell_runs_apart():
    """The table names each run by its folder, with parent folders where runs share a name (study.py's
    <config>/<pair> runs)."""
    runs = ["out/study/portrait/drawn", "out/study/baseline_ti/drawn/", "out/a/x/me", "out/b/x/me", "out/solo"]
    assert ev.run_names(runs) == ["portrait/drawn", "baseline_ti/drawn", "a/x/me", "b/x/me", "solo"]


def test_prompts_models_and_records_of_a_run(tmp_path):
    """Every run gets one prompt protocol (its first composed prompt, alone and with each description), whatever
    its number of templates; a run with pipeline/ is drawn from it even with init_from given, and one whose
    pipeline/ is missing, or that learned an object, is refused; a draw record cut short counts as none."""
    cfg = dict(tokens=["<v1>", "<v2>"], composed_templates=["a {} in {}", "b {} in {}", "c {} in {}"])
    assert ev.eval_prompts(cfg, ("smiling",)) == ["a <v1> in <v2>", "a <v1> in <v2>, smiling"]
    run = make_run_folder(tmp_path / "db", save_pipeline=True)
    with pytest.raises(SystemExit, match="pipeline is missing"):
        ev.read_run(str(run))
    (run / "pipeline").mkdir()
    cfg = ev.read_run(str(run))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "init_from", "tiny")
        assert ev.base_model(str(run), cfg) == (str(run / "pipeline"), None)
    with pytest.raises(SystemExit, match="learned an object"):
        ev.read_run(str(make_run_folder(tmp_path / "toy", subject="object")))
    (tmp_path / ev.DRAW_FILE).write_text('{"plain": {"ste')
    assert ev.read_draw_file(str(tmp_path)) == {}
    ev.remember(str(tmp_path), "plain", dict(steps=2))
    assert ev.read_draw_file(str(tmp_path)) == {"plain": {"steps": 2}}


def make_run_folder(out, **settings):
    """The files read_run checks, without weights worth drawing with."""
    out.mkdir()
    (out / lora.EMBEDS_FILE).write_bytes(b"")
    (out / "config.json").write_text(json.dumps(dict(
        init_from="tiny", tokens=["<v1>", "<v2>"], composed_templates=["a {} in {}"], source_dir=str(out),
        reference_dir=str(out), resolution=64, **settings)))
    return out


def test_a_retrained_pipeline_is_drawn_anew(tmp_path, monkeypatch):
    """The image cache knows a DreamBooth run's pipeline/ by its weight files: the same files reuse the images,
    a pipeline trained again (other files) draws anew."""
    run = make_run_folder(tmp_path / "db", save_pipeline=True)
    (run / "pipeline" / "unet").mkdir(parents=True)
    weights = run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({"w": torch.zeros(2)}, str(weights))
    save_file({"<v1>": torch.zeros(4)}, str(run / lora.EMBEDS_FILE))
    drawn = []

    def draw(cfg, run, prompts, index, seeds, folder, files):  # blank images, saved as draw_images saves them
        drawn.append(1)
        for f in files:
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(folder, f))
        return [np.zeros((8, 8, 3), np.uint8) for _ in files]
    monkeypatch.setattr(ev, "draw_images", draw)
    monkeypatch.setattr(ev, "postprocess", False)
    (run / "eval").mkdir()
    args = (str(run), ev.read_run(str(run)), str(run / "eval"), ["p"], [0, 0], [0, 1], {})
    for _ in range(2):
        ev.run_images(*args)
    assert len(drawn) == 1
    save_file({"w": torch.ones(3)}, str(weights))
    ev.run_images(*args)
    assert len(drawn) == 2
