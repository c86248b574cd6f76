# The official script's settings (junhahyung/MagiCapture, train_magicapture.sh and
# magicapture_train.py), where they differ from the paper's (train.py's defaults), so the two can
# be compared.
import lora
variant = "fp16"
out_dir = "out/portrait_official"
# --scale_lr multiplies by 4 (batch 1 x accumulation 4), but the loop never accumulates:
# in effect batch 1 at 4x the paper's learning rates
grad_accum = 1
lr_embed1 = 2e-3
lr_lora = 4e-4
lr_embed2 = 4e-5
lr_lora_text = 4e-4     # not given separately: the UNet LoRA's rate
# LoRA rank 4 on every attention projection (self and cross), the first feed-forward
# projection, and the text encoder's q/k/v/out
lora_targets = lora.OFFICIAL_UNET
lora_text_encoder = True
style_boost = 2.0       # style and composed losses x2 in the first half of each phase
source_templates = ("a photo of a {} person", "a rendering of a {} person", "a cropped photo of a {} person",
                    "the photo of a {} person", "a close-up photo of a {} person", "a bright photo of a {} person",
                    "a good photo of a {} person", "a photo of one {} person", "a portrait of a {} person",
                    "a photo of the {} person")
reference_templates = ("a painting of a person in the style of {}",)
composed_templates = ("a photo of a {} person in the style of {}",)
lambda_id = 0.25
