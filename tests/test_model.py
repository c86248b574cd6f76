"""model.py against diffusers/transformers on small random configs, plus loading edge cases.
Run: python -m pytest -q tests/test_model.py"""
import dataclasses
import inspect
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import model
from conftest import rel_err

TOL = 1e-4  # relative max abs difference allowed in fp32

def load(path):
    return model.StableDiffusion.from_pretrained(path)

def test_text_encoder_matches_transformers(reference):
    """Last hidden state (after final_layer_norm) equals transformers' CLIPTextModel."""
    path, (_, _, text) = reference
    sd = load(path)
    ids = sd.tokenizer(["a photo of a person", "", "an old oil painting, dark background"])
    ours = sd.text_encoder(ids)
    with torch.no_grad():
        ref = text(ids).last_hidden_state
    err = rel_err(ours, ref)
    assert err < TOL, f"text encoder rel err {err:.2e}"

def test_unet_matches_diffusers(reference):
    """Noise prediction equals diffusers' UNet2DConditionModel, on an odd latent size (10 wide)."""
    path, (unet, _, _) = reference
    sd = load(path)
    torch.manual_seed(1)
    x, ctx = torch.randn(2, 4, 12, 10), torch.randn(2, 77, 32)
    t = torch.tensor([981, 7])
    ours = sd.unet(x, t, ctx)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
    err = rel_err(ours, ref)
    assert err < TOL, f"UNet rel err {err:.2e}"

def test_vae_matches_diffusers(reference):
    """Posterior mean/logvar and decoded images equal diffusers' AutoencoderKL."""
    path, (_, vae, _) = reference
    sd = load(path)
    torch.manual_seed(2)
    img = torch.rand(2, 3, 24, 20) * 2 - 1
    mean, logvar = sd.vae.encode(img)
    z = torch.randn_like(mean)
    with torch.no_grad():
        post = vae.encode(img).latent_dist
        dec = vae.decode(z).sample
    for name, a, b in (("mean", mean, post.mean), ("logvar", logvar, post.logvar), ("decode", sd.vae.decode(z), dec)):
        err = rel_err(a, b)
        assert err < TOL, f"VAE {name} rel err {err:.2e}"

def test_legacy_files_load_and_match(reference, tmp_path):
    """Legacy VAE names (query/key/value/proj_attn), text keys with the text_model. prefix and a
    position_ids buffer load strictly and give the same outputs."""
    path, (_, vae, text) = reference
    legacy = str(tmp_path / "legacy")
    shutil.copytree(path, legacy)
    f = os.path.join(legacy, "vae", "diffusion_pytorch_model.safetensors")
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = load_file(f)
    renamed = {}
    for k, v in sd.items():
        for new, old in names.items():
            if "mid_block.attentions" in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
        renamed[k] = v
    assert any(".proj_attn." in k for k in renamed)
    save_file(renamed, f)
    f = os.path.join(legacy, "text_encoder", "model.safetensors")
    sd = {"text_model." + k: v for k, v in load_file(f).items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, f)
    ours = load(legacy)
    z = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert rel_err(ours.vae.decode(z), vae.decode(z).sample) < TOL
        ids = ours.tokenizer(["a red face"])
        assert rel_err(ours.text_encoder(ids), text(ids).last_hidden_state) < TOL

def test_diffusers_loads_our_saved_pipeline(tiny_dir):
    """save_pretrained writes a folder diffusers' StableDiffusionPipeline loads, with identical weights."""
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    sd = load(tiny_dir)
    for ours, ref in ((sd.unet, pipe.unet), (sd.vae, pipe.vae)):
        theirs = ref.state_dict()
        for k, v in ours.state_dict().items():
            assert torch.equal(v, theirs[k]), k
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)

def test_ddim_timesteps():
    """50 DDIM steps with 'leading' spacing and steps_offset 1 are 981, 961, ..., 1 (as diffusers)."""
    import diffusers
    ts = model.Schedule(model.ScheduleConfig()).ddim_timesteps(50)
    assert ts[:3] == [981, 961, 941] and ts[-1] == 1 and len(ts) == 50
    ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    for n in (20, 50, 37):
        ref.set_timesteps(n)
        assert model.Schedule(model.ScheduleConfig()).ddim_timesteps(n) == ref.timesteps.tolist()

def test_schedule_matches_diffusers():
    """alphas_cumprod and add_noise equal diffusers' DDPM schedule for SD1.5."""
    import diffusers
    ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s = model.Schedule(model.ScheduleConfig())
    assert torch.allclose(s.alphas_cumprod, ref.alphas_cumprod.float(), atol=1e-7)
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    assert torch.allclose(s.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6)
    xt = s.add_noise(x0, noise, t)
    assert torch.allclose(s.predict_x0(xt, noise, t), x0, atol=1e-3)

def test_predict_x0_inverts_add_noise():
    """predict_x0 (eq. 7) recovers z0 from add_noise's z_t with the true eps, per-sample timesteps or one int."""
    g = torch.Generator().manual_seed(0)
    s = model.Schedule(model.ScheduleConfig())
    z0, eps = (torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0, 500, 999])  # abar 0.9991, 0.28, 0.0047: both ends of the SD1.5 schedule
    diff = (s.predict_x0(s.add_noise(z0, eps, t), eps, t) - z0).abs().max().item()
    assert diff < 1e-10, f"max abs diff {diff:.2e}"
    a = s.alphas_cumprod[981].item()
    z_t = a ** 0.5 * z0 + (1 - a) ** 0.5 * eps
    diff = (s.predict_x0(z_t, eps, 981) - z0).abs().max().item()
    assert diff < 1e-6, f"int timestep: max abs diff {diff:.2e}"
    assert s.predict_x0(z_t.bfloat16(), eps.float(), 981).dtype == torch.bfloat16  # the dtype of z_t

@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_matches_diffusers_pipeline(tiny_dir, eta):
    """20 DDIM steps with guidance from given latents equal diffusers' StableDiffusionPipeline within 1e-4."""
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    sd = load(tiny_dir)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a person", "an oil painting of a woman"]
    kw = dict(num_inference_steps=20, guidance_scale=7.5, negative_prompt=["blurry", ""], latents=latents,
              output_type="pt", eta=eta)
    if eta:  # eta > 0 draws noise at each step: give both the same stream
        kw["generator"] = torch.Generator().manual_seed(5)
    ref = pipe(prompts, **kw).images
    ours = sd.sample(prompts, negative_prompt=["blurry", ""], steps=20, guidance=7.5, latents=latents, eta=eta,
                     seed=5 if eta else None, height=128, width=128)
    err = (ours - ref).abs().max().item()
    assert err < 1e-4, f"max pixel difference {err:.2e}"

@pytest.mark.parametrize("spacing", [None, "leading"])
def test_euler_ancestral_matches_diffusers(tiny_dir, spacing):
    """sampler='euler_a' equals diffusers' EulerAncestralDiscreteScheduler set up from the model's scheduler config,
    with the same latents and noise stream, within 1e-4: 'linspace' where the config gives no timestep_spacing
    (SD1.5's file; the official MagiCapture inference), 'leading' where it says so (SDXL's)."""
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    config = {k: v for k, v in pipe.scheduler.config.items() if k != "timestep_spacing"}
    assert "timestep_spacing" not in json.load(open(os.path.join(tiny_dir, "scheduler", "scheduler_config.json")))
    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(
        config, **({"timestep_spacing": spacing} if spacing else {}))
    pipe.set_progress_bar_config(disable=True)
    sd = load(tiny_dir)
    sd.schedule.config.timestep_spacing = spacing
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = pipe(["a photo of a person"], num_inference_steps=15, guidance_scale=7.0, latents=latents,
               output_type="pt", generator=torch.Generator().manual_seed(3)).images
    ours = sd.sample(["a photo of a person"], steps=15, guidance=7.0, latents=latents, seed=3, sampler="euler_a",
                     height=128, width=128)
    err = (ours - ref).abs().max().item()
    assert err < 1e-4, f"max pixel difference {err:.2e}"
    with pytest.raises(ValueError, match="sampler must be"):
        sd.sample(["a"], steps=1, sampler="plms")

def test_sample_seed_reproducible(tiny_dir):
    """The same seed gives the same images; another seed does not."""
    sd = load(tiny_dir)
    a, b, c = (sd.sample(["a face"], steps=3, seed=s, height=64, width=64) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (1, 3, 64, 64)
    assert 0 <= a.min() and a.max() <= 1
    # a seed per image: an ancestral sampler's image is then the same alone or in a batch (to float rounding)
    for sampler, kw in (("euler_a", {}), ("ddim", dict(eta=1.0))):
        pair = sd.sample(["a face", "a face"], steps=3, seed=[5, 6], height=64, width=64, sampler=sampler, **kw)
        alone = sd.sample(["a face"], steps=3, seed=[6], height=64, width=64, sampler=sampler, **kw)
        assert (pair[1] - alone[0]).abs().max() < 1e-4 and (pair[0] - pair[1]).abs().max() > 1e-2, sampler

# --- tokenizer ---------------------------------------------------------------

PROMPTS = [
    "a photo of a person",
    "A PHOTO   of\ta\nPerson",                 # case and whitespace
    "an old oil painting, dark background!!! (close-up); 1024x768",  # punctuation and digits
    "portrait of a woman, smiling " * 20,   # longer than 77 tokens: truncated with EOS kept
    "café naïve Zoë — 東京 🙂",              # non-ASCII: byte-level fallback, NFC
    "cafe\u0301 vs caf\u00e9",              # NFC makes both spellings the same
    "",
    "it's the person's face; they'll smile",  # contractions
]

def test_tokenizer_matches_transformers(tiny_dir):
    """Ids equal transformers' CLIPTokenizer on the same vocab files, with and without placeholder tokens."""
    import transformers
    ref = transformers.CLIPTokenizer.from_pretrained(os.path.join(tiny_dir, "tokenizer"))
    ours = model.CLIPTokenizer.from_dir(os.path.join(tiny_dir, "tokenizer"))
    def check(prompts):
        want = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        got = ours(prompts)
        for i, p in enumerate(prompts):
            assert torch.equal(got[i], want[i]), f"{p!r}: {got[i][:20].tolist()} vs {want[i][:20].tolist()}"
    check(PROMPTS)
    assert ours(PROMPTS[3])[0, -1] == ours.eos_id and ours(PROMPTS[3]).shape == (1, 77)
    n = len(ours.vocab)
    assert ours.add_tokens(["<v1>", "<v2>"]) == [n, n + 1]
    ref.add_tokens(["<v1>", "<v2>"])
    check(["a photo of <v1> person in the <v2> style", "<v1>,<v2>", "a <V1> face"])

def test_check_length_warns_with_dropped_text(capsys):
    """A prompt over 77 tokens is reported with the number of dropped tokens and their text; short ones are not."""
    tok = model.tiny_tokenizer()
    tok.check_length(["a photo of a person", "a " * 75])  # 75 words + BOS + EOS = 77: nothing dropped
    assert capsys.readouterr().out == ""
    long = "a photo of " + "a " * 72 + "man with red hair"  # BOS + 79 words + EOS: the last 4 words go
    tok.check_length([long])
    out = capsys.readouterr().out
    assert "81 tokens" in out and "4 tokens are dropped: 'man with red hair'" in out, out
    assert tok(long)[0, -1] == tok.eos_id  # truncation itself is unchanged: BOS + 75 + EOS

def test_check_length_rejects_dropped_placeholder():
    """A placeholder token past the 77-token limit is an error naming the prompt and the token."""
    tok = model.tiny_tokenizer()
    tok.add_tokens(["<v1>", "<v2>"])
    tok.check_length(["a photo of <v1> " + "a " * 73])  # <v1> kept: no error
    long = "a photo of <v1> " + "a " * 73 + "in the <v2> style"
    with pytest.raises(ValueError, match="placeholder '<v2>'") as e:
        tok.check_length(["a photo", long])
    assert repr(long) in str(e.value)

def test_tokenizer_reads_added_tokens(tiny_dir, tmp_path):
    """A tokenizer folder with a token added after the vocabulary (a textual inversion saved into a pipeline) is read
    as transformers reads it, in its three file layouts: the token is one id, placeholders come after it, and
    our save keeps it for transformers."""
    import transformers
    ref = transformers.CLIPTokenizer.from_pretrained(os.path.join(tiny_dir, "tokenizer"))
    n = len(ref)
    ref.add_tokens(["<cat-toy>"])
    ref.save_pretrained(tmp_path / "t5")  # transformers 5: tokenizer.json's added_tokens
    v4 = tmp_path / "t4"  # transformers 4's slow save: vocab files, added_tokens.json, added_tokens_decoder
    shutil.copytree(os.path.join(tiny_dir, "tokenizer"), v4)
    (v4 / "added_tokens.json").write_text(json.dumps({"<cat-toy>": n}))
    prompts = ["a <cat-toy> photo", "<cat-toy>,<cat-toy> on a table", "a cat toy"]
    want = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert (want == n).sum() == 3  # the reference reads the token as one id
    for folder in (tmp_path / "t5", v4):
        ours = model.CLIPTokenizer.from_dir(str(folder))
        assert torch.equal(ours(prompts), want), folder
        assert ours.base_size == n + 1 and ours.add_tokens(["<v1>"]) == [n + 1]
        with pytest.raises(ValueError, match="already in the vocabulary"):
            ours.add_tokens(["<cat-toy>"])
    ours.save(str(tmp_path / "saved"))
    back = transformers.CLIPTokenizer.from_pretrained(tmp_path / "saved")
    assert torch.equal(back(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids, want)
    assert torch.equal(model.CLIPTokenizer.from_dir(str(tmp_path / "saved"))(prompts), want)
    (v4 / "added_tokens.json").write_text(json.dumps({"<cat-toy>": n + 1}))  # a gap after the vocabulary
    with pytest.raises(ValueError, match="added tokens have ids"):
        model.CLIPTokenizer.from_dir(str(v4))

def test_pipeline_with_added_token_round_trips(tiny_dir, tmp_path):
    """A pipeline saved by diffusers with a token added (its text encoder one row longer) loads, and our
    save_pretrained keeps the token and its row for diffusers."""
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    n = len(pipe.tokenizer)
    pipe.tokenizer.add_tokens(["<cat-toy>"])
    pipe.text_encoder.resize_token_embeddings(n + 1)
    row = pipe.text_encoder.get_input_embeddings().weight.data[n]
    row.copy_(torch.randn(row.shape))
    pipe.save_pretrained(tmp_path / "in")
    sd = load(str(tmp_path / "in"))
    ids = sd.tokenizer(["a <cat-toy> photo"])
    assert ids[0, 2] == n and torch.equal(sd.text_encoder.text_model.embeddings.token_embedding.weight[n], row)
    sd.save_pretrained(str(tmp_path / "out"))
    back = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out", safety_checker=None)
    assert back.tokenizer("a <cat-toy> photo").input_ids[2] == n
    assert torch.equal(back.text_encoder.get_input_embeddings().weight[n], row)

def test_tokenizer_rejects_existing_token(tiny_dir):
    """Adding a token already in the vocabulary is an error, not a silent alias."""
    tok = model.CLIPTokenizer.from_dir(os.path.join(tiny_dir, "tokenizer"))
    tok.add_tokens(["<v1>"])
    with pytest.raises(ValueError, match="already in the vocabulary"):
        tok.add_tokens(["<v1>"])

# --- attention recording -----------------------------------------------------

def test_attention_recorder(tiny_dir):
    """Recorded probabilities equal an independent softmax, carry gradient to the UNet,
    and leave the output unchanged; without a recorder nothing is kept."""
    sd = load(tiny_dir)
    v = sd.tokenizer.add_tokens(["<v1>"])[0]
    sd.text_encoder.resize_token_embeddings(len(sd.tokenizer))
    ids = sd.tokenizer(["a photo of <v1> person", "a photo"])
    ctx = sd.text_encoder(ids)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([500, 500])
    before = sd.unet(x, t, ctx)
    # hook the input of one 8x8 cross-attention layer to compute its softmax independently
    layer = sd.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    seen = {}
    hook = layer.register_forward_hook(lambda m, args, kw, out: seen.update(x=args[0]), with_kwargs=True)
    sd.unet.requires_grad_(True)
    rec = model.AttentionRecorder(ids, [v, sd.tokenizer.eos_id], resolutions=(8,))
    with sd.unet.record_attention(rec):
        out = sd.unet(x, t, ctx)
    hook.remove()
    assert torch.allclose(out, before, atol=1e-5), (out - before).abs().max()
    # 8x8 layers: down_blocks.1 (1 layer) and up_blocks.2 (2 layers) for layers_per_block=1
    assert rec.names == ["down_blocks.1.attentions.0.transformer_blocks.0.attn2",
                         "up_blocks.2.attentions.0.transformer_blocks.0.attn2",
                         "up_blocks.2.attentions.1.transformer_blocks.0.attn2"], rec.names
    m = rec.maps[0]
    assert m.shape == (2, 2, 8, 8, 2)
    q = layer.to_q(seen["x"]).view(2, 64, 2, 16).transpose(1, 2)
    k = layer.to_k(ctx).view(2, 77, 2, 16).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)  # (B, heads, 64, 77)
    pos = (ids[0] == v).nonzero().item()
    assert torch.allclose(m[0, :, :, :, 0].reshape(2, 64), p[0, :, :, pos], atol=1e-6)
    assert torch.equal(m[1, ..., 0], torch.zeros_like(m[1, ..., 0]))  # <v1> absent from prompt 2
    eos = ids[1] == sd.tokenizer.eos_id  # EOS appears many times (padding): columns summed
    assert torch.allclose(m[1, ..., 1].reshape(2, 64), p[1][:, :, eos].sum(-1), atol=1e-5)
    m.sum().backward()
    g = layer.to_q.weight.grad
    assert g is not None and g.abs().sum() > 0
    # recorder detached afterwards: the same call now records nothing and gives the same output
    assert all(a.recorder is None for n, a in sd.unet.named_modules() if n.endswith("attn2"))
    assert torch.equal(sd.unet(x, t, ctx), before)
    # under bf16 autocast (training's, CPU's here) the maps stay fp32: eq. 8's min-max scaling magnifies rounding
    rec = model.AttentionRecorder(ids, [v, sd.tokenizer.eos_id], resolutions=(8,))
    with sd.unet.record_attention(rec), torch.autocast("cpu", dtype=torch.bfloat16):
        sd.unet(x, t, ctx)
    assert {m.dtype for m in rec.maps} == {torch.float32}

def test_count_flops_counts_cpu_attention(tiny_dir):
    """count_flops on a UNet forward+backward with the CPU's fused attention kernel gives the count of the same
    pass with attention as explicit matmuls (PyTorch's math backend, which torch's counter always sees), plus
    the QK^T a fused kernel computes again in its backward, which torch counts for its GPU kernels: 2bhsd of
    the forward's 4bhsd."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sd = load(tiny_dir)
    sd.unet.requires_grad_(True)
    x, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32), torch.tensor([10, 500])
    counters = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend), model.count_flops() as counter:
            sd.unet(x, t, ctx).square().mean().backward()
        counters.append(counter)
    attention = counters[0].by_op[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu]
    assert attention > 0
    assert counters[0].get_total_flops() == counters[1].get_total_flops() + attention // 2

def test_count_flops_equals_torch(tiny_dir):
    """count_flops gives torch's FlopCounterMode's count, op by op, of what a training step runs: the text
    encoder, a UNet forward+backward and a VAE decode with gradient (nearest upsampling and silu's backward, which
    torch's counter runs decomposed, count nothing either way)."""
    from torch.utils.flop_counter import FlopCounterMode
    sd = load(tiny_dir)
    sd.requires_grad_(True)
    ids = sd.tokenizer(["a photo of a person"] * 2)
    x, t, z = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(1, 4, 8, 8, requires_grad=True)
    ours, theirs = model.count_flops(), FlopCounterMode(display=False)
    for counter in (ours, theirs):
        with counter:
            sd.unet(x, t, sd.text_encoder(ids)).square().mean().backward()
            sd.vae.decode(z).square().mean().backward()
    assert ours.by_op == theirs.get_flop_counts()["Global"] and ours.get_total_flops() > 0

def test_cross_attention_sides_are_the_recorded_ones():
    """UNet.cross_attention_sides gives the sides at which a recorder asking for every side records, for the SD1.5
    and SDXL layouts (SDXL: no attention at the top level), at even and odd latent sides."""
    for sd in (model.StableDiffusion.tiny(), model.StableDiffusion.tiny_xl()):
        for side in (8, 9):
            ids = torch.zeros(1, 77, dtype=torch.long)
            rec = model.AttentionRecorder(ids, [0], range(1, side + 1))
            context = torch.randn(1, 77, sd.unet.config.cross_attention_dim)
            added = None
            if sd.is_xl:
                added = dict(text_embeds=torch.randn(1, sd.text_encoder_2.config.projection_dim),
                             time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]]))
            with torch.no_grad(), sd.unet.record_attention(rec):
                sd.unet(torch.randn(1, 4, side, side), torch.tensor([10]), context, added)
            recorded = sorted({m.shape[2] for m in rec.maps}, reverse=True)
            assert recorded == sd.unet.cross_attention_sides(side), (sd.is_xl, side, recorded)

def test_gradient_checkpointing_same_gradients(tiny_dir):
    """Gradient checkpointing changes memory, not the gradients, also while attention is recorded
    (the attention loss's gradient included)."""
    sd = load(tiny_dir)
    sd.unet.requires_grad_(True)
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    ids = torch.randint(0, 100, (1, 77))
    def stored(fn):
        """fn() -> (its output, the elements of the tensors autograd keeps for the backward pass while it runs)"""
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            return fn(), sum(kept)
    for resolutions in ((), (8,)):
        grads, names, kept = [], [], []
        for ckpt in (False, True):
            sd.unet.gradient_checkpointing = ckpt
            sd.unet.zero_grad()
            rec = model.AttentionRecorder(ids, ids[0, :2].tolist(), resolutions)
            with sd.unet.record_attention(rec):
                out, n = stored(lambda: sd.unet(x, 10, ctx))
                loss = out.square().mean() + sum(m.square().sum() for m in rec.maps)
            loss.backward()
            grads.append(sd.unet.conv_in.weight.grad.clone())
            names.append(list(rec.names))
            kept.append(n)
        assert torch.allclose(grads[0], grads[1], atol=1e-6), resolutions
        assert kept[1] < kept[0] / 2, kept  # checkpointing did happen: the blocks' activations were not kept
        assert names[0] == names[1]  # each layer once, though the checkpointed ones ran again in the backward
    # a recorder kept over several forward passes (sample.py's, over the sampling steps) keeps each pass's maps
    with sd.unet.record_attention(rec):
        for _ in range(2):
            sd.unet(x, 10, ctx).square().mean().backward()
    assert rec.names == names[1] * 3
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    grads = []
    for ckpt in (False, True):  # the VAE decoder, as the identity loss uses it
        sd.vae.gradient_checkpointing = ckpt
        z.grad = None
        out, n = stored(lambda: sd.vae.decode(z))
        out.square().mean().backward()
        grads.append(z.grad.clone())
        kept.append(n)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert kept[-1] < kept[-2] / 2, kept[-2:]

# --- loading errors ----------------------------------------------------------

def edit_config(path, part, **changes):
    f = os.path.join(path, part, "config.json" if part != "scheduler" else "scheduler_config.json")
    with open(f) as fh:
        cfg = json.load(fh)
    cfg.update(changes)
    with open(f, "w") as fh:
        json.dump(cfg, fh)

@pytest.mark.parametrize("part,change,message", [
    ("unet", dict(upcast_attention=True), "Stable Diffusion 2.1"),
    ("unet", dict(addition_embed_type="text_time"), "SDXL"),
    ("unet", dict(transformer_layers_per_block=[1, 2, 10]), "SDXL"),
    ("scheduler", dict(prediction_type="v_prediction"), "v-prediction"),
    ("unet", dict(down_block_types=["SimpleCrossAttnDownBlock2D"] * 4), "SimpleCrossAttnDownBlock2D"),
])
def test_unsupported_config_is_named(tiny_dir, tmp_path, part, change, message):
    """A config this code does not implement fails before any weight is read, naming the field."""
    path = str(tmp_path / "m")
    shutil.copytree(tiny_dir, path)
    edit_config(path, part, **change)
    with pytest.raises(ValueError, match=message) as e:
        load(path)
    assert list(change)[0] in str(e.value)

def other_value(want):
    """A config value unlike want, of a type a config.json could hold."""
    if isinstance(want, bool):
        return not want
    if isinstance(want, (int, float)):
        return want + 1
    return "other" if want is None else want + "_other"

# constructor arguments of the reference classes that config_from_dict checks elsewhere, or that cannot change
# what these models compute: the block types (a check of their own), the number of heads of the "text"
# addition embedding (the only addition embedding built is SDXL's "text_time"), and sampler settings of
# diffusers' own schedulers (model.py's samplers are its own)
CHECKED_ELSEWHERE = {"down_block_types", "up_block_types", "addition_embed_type_num_heads", "skip_prk_steps",
                     "clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio",
                     "sample_max_value", "interpolation_type", "use_karras_sigmas", "use_exponential_sigmas",
                     "use_beta_sigmas", "sigma_min", "sigma_max", "timestep_type", "final_sigmas_type"}

@pytest.mark.parametrize("part,classes", [
    ("unet", ("UNet2DConditionModel",)), ("vae", ("AutoencoderKL",)),
    ("scheduler", ("PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler")),
])
def test_every_reference_setting_is_read_or_refused(part, classes):
    """Each constructor argument of diffusers' class is a field model.py reads, or one it refuses at any value
    but SD1.5's and SDXL's, so no config.json setting is silently ignored; and each refusal does refuse."""
    import diffusers
    ours = {"unet": model.UNetConfig, "vae": model.VAEConfig, "scheduler": model.ScheduleConfig}[part]
    read = {f.name for f in dataclasses.fields(ours)}
    for name in classes:
        args = set(inspect.signature(getattr(diffusers, name).__init__).parameters) - {"self"}
        unknown = args - read - set(model.UNSUPPORTED[part]) - CHECKED_ELSEWHERE
        assert not unknown, f"{name}'s {sorted(unknown)}: neither read nor refused by model.config_from_dict"
    for key, (want, meaning) in model.UNSUPPORTED[part].items():
        with pytest.raises(ValueError, match=re.escape(f"{key}={other_value(want)!r}")):
            model.config_from_dict(ours, {key: other_value(want)}, part)
    model.config_from_dict(ours, {key: want for key, (want, _) in model.UNSUPPORTED[part].items()}, part)

def test_missing_file_is_named(tiny_dir, tmp_path):
    """A missing weights file or config names the path."""
    path = str(tmp_path / "m")
    shutil.copytree(tiny_dir, path)
    os.remove(os.path.join(path, "vae", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="vae/diffusion_pytorch_model.safetensors"):
        load(path)
    with pytest.raises(FileNotFoundError, match="fp16"):
        model.StableDiffusion.from_pretrained(tiny_dir, variant="fp16")
    os.remove(os.path.join(path, "unet", "config.json"))
    with pytest.raises(FileNotFoundError, match="unet/config.json"):
        load(path)

def test_shards_and_tokenizer_json_load(tiny_dir, tmp_path):
    """A UNet in shards with their index (as diffusers saves one over its size limit) and a tokenizer saved by
    transformers 5 (tokenizer.json only) load to the same weights and ids."""
    import diffusers
    import transformers
    path = str(tmp_path / "m")
    shutil.copytree(tiny_dir, path)
    shutil.rmtree(os.path.join(path, "unet"))
    diffusers.UNet2DConditionModel.from_pretrained(os.path.join(tiny_dir, "unet")).save_pretrained(
        os.path.join(path, "unet"), max_shard_size="200KB")
    assert len([f for f in os.listdir(os.path.join(path, "unet")) if f.endswith(".safetensors")]) > 1
    shutil.rmtree(os.path.join(path, "tokenizer"))
    transformers.CLIPTokenizer.from_pretrained(os.path.join(tiny_dir, "tokenizer")).save_pretrained(
        os.path.join(path, "tokenizer"))
    for name in ("vocab.json", "merges.txt"):  # whatever transformers wrote, only tokenizer.json is left
        if os.path.exists(os.path.join(path, "tokenizer", name)):
            os.remove(os.path.join(path, "tokenizer", name))
    ours, want = load(path), load(tiny_dir)
    for (k, a), (_, b) in zip(sorted(ours.unet.state_dict().items()), sorted(want.unet.state_dict().items())):
        assert torch.equal(a, b), k
    assert torch.equal(ours.tokenizer(PROMPTS), want.tokenizer(PROMPTS))

def test_unreadable_weights_are_named(tiny_dir, tmp_path):
    """A .bin where the .safetensors should be, a file cut short, and one checkpoint file instead of a folder are
    each named with what to do."""
    path = str(tmp_path / "m")
    shutil.copytree(tiny_dir, path)
    vae = os.path.join(path, "vae", "diffusion_pytorch_model.safetensors")
    data = open(vae, "rb").read()
    open(vae, "wb").write(data[:len(data) // 2])
    with pytest.raises(ValueError, match="is not a readable .safetensors file"):
        load(path)
    os.replace(vae, vae.replace(".safetensors", ".bin"))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.bin is there, but only .safetensors"):
        load(path)
    with pytest.raises(FileNotFoundError, match="is one file; this reads the diffusers folder layout"):
        load(vae.replace(".safetensors", ".bin"))

def test_key_and_shape_mismatch_are_named(tiny_dir, tmp_path):
    """A missing key, an unexpected key and a wrong shape are each reported by name."""
    path = str(tmp_path / "m")
    shutil.copytree(tiny_dir, path)
    f = os.path.join(path, "unet", "diffusion_pytorch_model.safetensors")
    sd = load_file(f)
    del sd["conv_in.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["conv_out.weight"] = torch.zeros(1, 2, 3, 3)
    save_file(sd, f)
    with pytest.raises(ValueError) as e:
        load(path)
    msg = str(e.value)
    assert "conv_in.bias" in msg and "extra.weight" in msg and "conv_out.weight" in msg and f in msg

def test_offline_without_cache_is_clear(tmp_path):
    """With HF_HUB_OFFLINE=1 and an empty cache, a Hub id fails with advice, not a traceback maze."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = "import model; model.StableDiffusion.from_pretrained('stable-diffusion-v1-5/stable-diffusion-v1-5')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode != 0
    assert "HF_HUB_OFFLINE is set" in r.stderr and "hf download" in r.stderr, r.stderr[-2000:]

def test_bad_name_is_clear():
    """A name that is neither a folder, a repo id nor 'tiny' says what is expected."""
    with pytest.raises(FileNotFoundError, match="neither a folder nor a Hub repo id"):
        model.StableDiffusion.from_pretrained("./no/such/dir")

def test_tiny_is_seeded_locally():
    """tiny() leaves the global random state as it found it; the same seed gives the same weights."""
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = model.StableDiffusion.tiny()
    assert torch.equal(torch.get_rng_state(), state), "tiny() changed the global RNG state"
    b, c = model.StableDiffusion.tiny(), model.StableDiffusion.tiny(seed=1)
    for name, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[name]), f"{name} differs between two tiny(seed=0)"
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight), "seed=1 gave seed 0's weights"

def test_tiny_builds_on_first_use(tmp_path, monkeypatch):
    """init_from='tiny' builds and saves the tiny pipeline once, then loads it from disk."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    sd = model.StableDiffusion.from_pretrained("tiny")
    assert os.path.exists(os.path.join(tmp_path, "magicapture", "tiny-sd", "unet", "config.json"))
    again = model.StableDiffusion.from_pretrained("tiny")
    assert torch.equal(sd.unet.conv_in.weight, again.unet.conv_in.weight)

def test_dtype_and_device(tiny_dir):
    """from_pretrained casts every part to the requested dtype and freezes it."""
    sd = model.StableDiffusion.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    for m in (sd.unet, sd.vae, sd.text_encoder):
        assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in m.parameters())
    img = sd.sample(["a face"], steps=2, seed=0, height=64, width=64)
    assert img.dtype == torch.float32 and torch.isfinite(img).all()
