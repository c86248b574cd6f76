"""The Hub downloads (model.hub_download, model.hub_file, faces.model_path) against a fake Hub on 127.0.0.1
(tests/fake_hub.py) laid out like the real repos: what is fetched, what is not, the fp16 variant, shards, offline
reuse of the cache, and the messages for a cache left incomplete or a download cut off.
Each call runs in a fresh interpreter: huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE on import.
Run: python -m pytest -q tests/test_hub.py"""
import os
import shutil
import subprocess
import sys
import zlib

import pytest
from safetensors.torch import load_file, save_file

import model
import standins
from fake_hub import FakeHub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD, SHARDED, FACES = model.DEFAULT_REPO, "someone/sharded-fp16", "facefusion/models-3.0.0"
WEIGHTS = ["unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"]
CONFIGS = ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
           "text_encoder/config.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
           "tokenizer/tokenizer_config.json", "tokenizer/vocab.json"]
LOAD = ("import sys, torch, model; sd = model.StableDiffusion.from_pretrained(sys.argv[1], variant=sys.argv[2] or None);"
        "print(sd.unet.conv_in.weight.double().sum().item())")
FACE = "import faces; print(faces.model_path('detector'))"


def put(path, data=b"x" * 4096):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture(scope="module")
def hub(tiny_dir, tmp_path_factory):
    """SD1.5's repo layout with the tiny weights: fp32 and fp16 files, and what must never be fetched (the
    single-file checkpoints at the root, pickled .bin files, the safety checker); a fine-tune whose fp16 UNet is in
    shards, as diffusers names them; the face models' repo with a detector and its CRC32 .hash."""
    import diffusers
    root = tmp_path_factory.mktemp("repos")
    sd = str(root / "sd")
    shutil.copytree(tiny_dir, sd)
    for w in WEIGHTS:
        save_file({k: v.half() for k, v in load_file(f"{sd}/{w}.safetensors").items()}, f"{sd}/{w}.fp16.safetensors")
        put(f"{sd}/{w}.bin".replace("/model.bin", "/pytorch_model.bin"))
    for name in ("v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt", "safety_checker/model.safetensors",
                 "safety_checker/config.json", "unet/diffusion_pytorch_model.non_ema.safetensors",
                 "feature_extractor/preprocessor_config.json", "README.md"):
        put(f"{sd}/{name}")
    sharded = str(root / "sharded")
    shutil.copytree(sd, sharded)
    os.remove(f"{sharded}/unet/diffusion_pytorch_model.fp16.safetensors")
    unet = diffusers.UNet2DConditionModel.from_pretrained(f"{sd}/unet").half()
    unet.save_pretrained(f"{sharded}/unet", variant="fp16", max_shard_size="200KB")
    faces_repo = str(root / "faces")
    os.makedirs(faces_repo)
    detector = standins.detector(os.path.join(faces_repo, "retinaface_10g.onnx"), [])
    put(f"{faces_repo}/retinaface_10g.hash", f"{zlib.crc32(open(detector, 'rb').read()):08x}".encode())
    put(f"{faces_repo}/arcface_w600k_r50.onnx")
    with FakeHub({SD: sd, SHARDED: sharded, FACES: faces_repo}) as h:
        yield h


def call(hub, home, code, *args, offline=False):
    """Run code with the fake Hub as HF_ENDPOINT and `home` as HF_HOME -> (result, files fetched, requests made)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_ENDPOINT=hub.url, HF_HUB_DISABLE_PROGRESS_BARS="1",
               **({"HF_HUB_OFFLINE": "1"} if offline else {}))
    n = len(hub.log)
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    return r, sorted(f.partition(":")[2] for f in hub.downloads(n)), hub.log[n:]


def test_pipeline_fetches_its_files_only_then_loads_offline(hub, tmp_path):
    """A first load fetches the configs, tokenizer and three weight files, nothing else; the fp16 variant then
    fetches its three files only; each loads again offline without a request, with the weights it fetched."""
    r, fetched, _ = call(hub, tmp_path, LOAD, SD, "")
    assert r.returncode == 0, r.stderr[-3000:]
    assert fetched == sorted(CONFIGS + [f"{w}.safetensors" for w in WEIGHTS])
    want = load_file(os.path.join(hub.repos[SD].folder, "unet/diffusion_pytorch_model.safetensors"))
    assert abs(float(r.stdout) - want["conv_in.weight"].double().sum().item()) < 1e-9
    r, fetched, _ = call(hub, tmp_path, LOAD, SD, "fp16")
    assert r.returncode == 0 and fetched == sorted(f"{w}.fp16.safetensors" for w in WEIGHTS), (fetched, r.stderr)
    for variant in ("", "fp16"):
        r, _, requests = call(hub, tmp_path, LOAD, SD, variant, offline=True)
        assert r.returncode == 0 and not requests, (requests, r.stderr[-3000:])


def test_sharded_fp16_variant(hub, tmp_path):
    """A UNet saved in fp16 shards (diffusers' names: ...fp16-0000N-of-0000M.safetensors and its
    .safetensors.index.fp16.json) is fetched, shards and index, and loads."""
    r, fetched, _ = call(hub, tmp_path, LOAD, SHARDED, "fp16")
    assert r.returncode == 0, r.stderr[-3000:]
    shards = [f for f in fetched if f.startswith("unet/diffusion_pytorch_model.fp16-")]
    assert len(shards) > 1 and "unet/diffusion_pytorch_model.safetensors.index.fp16.json" in fetched, fetched
    assert not [f for f in fetched if f.endswith((".bin", ".ckpt")) or f.startswith("safety_checker")], fetched


def test_face_model_and_its_hash(hub, tmp_path):
    """faces.model_path fetches the .onnx and its .hash (the CRC32 checked), then finds them offline."""
    r, fetched, _ = call(hub, tmp_path, FACE)
    assert r.returncode == 0 and fetched == ["retinaface_10g.hash", "retinaface_10g.onnx"], (fetched, r.stderr)
    r, _, requests = call(hub, tmp_path, FACE, offline=True)
    assert r.returncode == 0 and not requests and r.stdout.strip().endswith("retinaface_10g.onnx"), r.stderr


def test_an_incomplete_cache_is_named(hub, tmp_path):
    """A download the Hub fails halfway leaves part of the pipeline cached: offline, the message says the copy is
    incomplete (not that the repo is not cached), with the command that fetches it."""
    hub.faults[(SD, "unet/diffusion_pytorch_model.safetensors")] = "500"
    try:
        r, _, _ = call(hub, tmp_path, LOAD, SD, "")
    finally:
        hub.faults.clear()
    assert r.returncode != 0 and "the Hub could not be reached, or the download failed" in r.stderr, r.stderr[-2000:]
    r, _, _ = call(hub, tmp_path, LOAD, SD, "", offline=True)
    assert r.returncode != 0 and "lacks some of its files: a download cut short" in r.stderr, r.stderr[-2000:]
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include model_index.json" in r.stderr


def test_a_connection_cut_off_is_a_missing_model(hub, tmp_path):
    """A face model whose download keeps being cut off (the HTTP library's own error, not an OSError) ends in
    faces.MissingModel with how to fetch it, not in the library's traceback."""
    hub.faults[(FACES, "retinaface_10g.onnx")] = "cut"
    try:
        r, _, _ = call(hub, tmp_path, FACE)
    finally:
        hub.faults.clear()
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and last.startswith("faces.MissingModel: retinaface_10g.onnx"), r.stderr[-2000:]
    assert "hf download facefusion/models-3.0.0 retinaface_10g.onnx" in last
