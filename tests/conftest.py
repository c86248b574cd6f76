"""Shared helpers: small random reference models from diffusers/transformers saved in the Hub's layout, and the
scripts run in the test process as the shell would run them."""
import contextlib
import io
import json
import os
import runpy
import sys
from types import SimpleNamespace

import pytest
import torch

import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def run_script(script, *args, cache):
    """python <script> <args> from the repository root with XDG_CACHE_HOME=cache, in this process (a new one
    spends seconds importing torch), as the shell would run it: -> (returncode, stdout, stderr); a SystemExit's
    message goes to stderr, as Python prints it."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setenv("XDG_CACHE_HOME", str(cache))
        mp.chdir(ROOT)
        mp.setattr(sys, "argv", [script, *args])
        try:
            release_out_dir(runpy.run_path(script, run_name="__main__"))
        except SystemExit as e:
            release_out_dir(error=e)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = 1 if isinstance(e.code, str) else e.code or 0
        except BaseException as e:
            release_out_dir(error=e)
            raise
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())

def stop_on_call(real, n):
    """`real` wrapped to raise KeyboardInterrupt (a Ctrl-C) on its n-th call, counting from this wrapping."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    return wrapper

def release_out_dir(namespace=None, error=None):
    """train.py locks its out_dir (an flock on out_dir/.lock, its global out_lock) until its process ends. Run in
    this process, it ends when its globals are freed, which a traceback or a returned namespace delays: let go
    now, as the end of its own process would, so the next run there (in this process or another) may start."""
    spaces = [namespace or {}]
    tb = error.__traceback__ if error is not None else None
    while tb is not None:  # the script's frames hold its globals
        spaces.append(tb.tb_frame.f_globals)
        tb = tb.tb_next
    for space in spaces:
        if space.get("out_lock") is not None:
            space["out_lock"].close()

def rel_err(a, b):
    """max |a - b| / max |b|: the parity measure the tests report."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

def hub_cache(root, repo_id, files):
    """A Hugging Face cache under `root` holding `files` ({name: bytes}) of repo_id at one snapshot, laid out as
    huggingface_hub lays it out, so code under test finds them with HF_HUB_CACHE=root and no network."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name, content in files.items():
        (snapshot / name).write_bytes(content)
    return snapshot

def save_reference_pipeline(path, unet_kwargs, vae_kwargs, text_kwargs, seed=0):
    """Random diffusers UNet/VAE and transformers CLIP text model saved as a diffusers-layout folder,
    with the tiny tokenizer's files. Returns the reference modules."""
    import diffusers
    import transformers
    torch.manual_seed(seed)
    tok = model.tiny_tokenizer()
    tok.save(os.path.join(path, "tokenizer"))
    unet = diffusers.UNet2DConditionModel(**unet_kwargs).eval()
    vae = diffusers.AutoencoderKL(**vae_kwargs).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tok.vocab), bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
        **text_kwargs)).eval()
    # random LayerNorm/GroupNorm affine parameters, so a swapped weight and bias would show
    with torch.no_grad():
        for m in (unet, vae, text):
            for name, p in m.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    unet.save_pretrained(os.path.join(path, "unet"))
    vae.save_pretrained(os.path.join(path, "vae"))
    text.save_pretrained(os.path.join(path, "text_encoder"))
    diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                            set_alpha_to_one=False, clip_sample=False).save_pretrained(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline"}, f)
    return unet, vae, text

SMALL = dict(
    # 3 levels, 2 layers per block, per-level head counts: unlike the tiny default on purpose
    unet_kwargs=dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=(2, 4, 4),
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                     cross_attention_dim=32, norm_num_groups=8, sample_size=16),
    vae_kwargs=dict(block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    text_kwargs=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=77, hidden_act="quick_gelu"),
)

@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """(folder, (unet, vae, text)) of a small random reference pipeline."""
    path = str(tmp_path_factory.mktemp("reference"))
    return path, save_reference_pipeline(path, **SMALL)

@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Our tiny random pipeline saved with save_pretrained."""
    path = str(tmp_path_factory.mktemp("tiny"))
    model.StableDiffusion.tiny().save_pretrained(path)
    return path
