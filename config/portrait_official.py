# The official script's settings (junhahyung/MagiCapture, train_magicapture.sh and
# magicapture_train.py), where they differ from the paper, so the two can be compared.
import lora
init_from = "stable-diffusion-v1-5/stable-diffusion-v1-5"
variant = "fp16"
source_dir = "data/source"
reference_dir = "data/reference"
out_dir = "out/portrait_official"
resolution = 512
phase1_steps = 1200
phase2_steps = 1500
# --scale_lr multiplies by 4 (batch 1 x accumulation 4), but the loop never accumulates:
# in effect batch 1 at 4x the paper's learning rates
grad_accum = 1
lr_embed1 = 2e-3
lr_lora = 4e-4
lr_embed2 = 4e-5
lr_lora_text = 4e-4     # not given separately: the UNet LoRA's rate
# LoRA rank 4 on every attention projection (self and cross), the first feed-forward
# projection, and the text encoder's q/k/v/out
lora_rank = 4
lora_alpha = 4.0
lora_targets = lora.OFFICIAL_UNET
lora_text_encoder = True
weight_decay = 1e-3
style_boost = 2.0       # style and composed losses x2 in the first half of each phase
source_templates = ("a photo of a {} person", "a rendering of a {} person", "a cropped photo of a {} person",
                    "the photo of a {} person", "a close-up photo of a {} person", "a bright photo of a {} person",
                    "a good photo of a {} person", "a photo of one {} person", "a portrait of a {} person",
                    "a photo of the {} person")
reference_templates = ("a painting of a person in the style of {}",)
composed_templates = ("a photo of a {} person in the style of {}",)
lambda_attn = 2.5
lambda_id = 0.25
t_id_max = 800          # identity loss timesteps t < 800 in phase 2
attn_resolutions = (16,)
dtype = "bf16"
eval_interval = 250
ckpt_interval = 250
