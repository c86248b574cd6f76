"""Parity at the full SD1.5 configuration with random weights (slow: the slow suite takes 33 s on 2 idle
CPU cores, peak RSS 3.8 GiB).
Run: python -m pytest -q -m slow"""
import pytest
import torch

import model
from conftest import rel_err

# the config.json files of stable-diffusion-v1-5/stable-diffusion-v1-5, as published
UNET = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
        "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                         "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
VAE = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
       "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
       "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
       "up_block_types": ["UpDecoderBlock2D"] * 4}
TEXT = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
        "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408}

def ours_from(module_cls, cfg_cls, cfg, part, ref):
    """Build ours from the config dict on the meta device and take the reference's tensors (shared, no copy)."""
    with torch.device("meta"):
        m = module_cls(model.config_from_dict(cfg_cls, cfg, part))
    sd = model.fix_legacy_keys(part, dict(ref.state_dict()))
    model.load_strict(m, sd, f"{part} reference")
    return m.eval()

def count(m):
    return sum(p.numel() for p in m.parameters())

@pytest.mark.slow
def test_full_unet():
    """SD1.5 UNet: 859.5 M parameters in 686 tensors; noise prediction equals diffusers (32x32 latents)."""
    import diffusers
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel.from_config(UNET).eval()
    ours = ours_from(model.UNet, model.UNetConfig, UNET, "unet", ref)
    assert round(count(ours) / 1e6, 1) == 859.5 and len(ours.state_dict()) == 686
    x, ctx = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 768)
    with torch.no_grad():
        err = rel_err(ours(x, 500, ctx), ref(x, 500, encoder_hidden_states=ctx).sample)
    assert err < 1e-4, f"UNet rel err {err:.2e}"

@pytest.mark.slow
def test_full_vae():
    """SD1.5 VAE: 83.7 M parameters; encode mean and decode equal diffusers (64x64 pixels)."""
    import diffusers
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL.from_config(VAE).eval()
    ours = ours_from(model.AutoencoderKL, model.VAEConfig, VAE, "vae", ref)
    assert round(count(ours) / 1e6, 1) == 83.7 and ours.config.scaling_factor == 0.18215
    img, z = torch.rand(1, 3, 64, 64) * 2 - 1, torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        e1 = rel_err(ours.encode(img)[0], ref.encode(img).latent_dist.mean)
        e2 = rel_err(ours.decode(z), ref.decode(z).sample)
    assert e1 < 1e-4 and e2 < 1e-4, f"VAE rel err encode {e1:.2e} decode {e2:.2e}"

@pytest.mark.slow
def test_full_text_encoder():
    """SD1.5 text encoder (CLIP ViT-L/14 text tower): 123.1 M parameters; hidden states equal transformers."""
    import transformers
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)).eval()
    ours = ours_from(model.CLIPTextModel, model.TextConfig, TEXT, "text_encoder", ref)
    assert round(count(ours) / 1e6, 1) == 123.1
    ids = torch.randint(0, 49408, (2, 77))
    with torch.no_grad():
        err = rel_err(ours(ids), ref(ids).last_hidden_state)
    assert err < 1e-4, f"text encoder rel err {err:.2e}"
