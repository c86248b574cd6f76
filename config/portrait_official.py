# The official script's settings (junhahyung/MagiCapture: train_magicapture.sh, magicapture_train.py,
# dataset.py), where they differ from the paper's (train.py's defaults), so the two can be compared.
import lora
variant = "fp16"
out_dir = "out/portrait_official"
# --scale_lr multiplies the UNet LoRA, text-encoder LoRA and phase-1 embedding rates by 4 (batch 1 x
# accumulation 4), but the loop never accumulates: in effect batch 1 at 4x the given rates
grad_accum = 1
lr_embed1 = 2e-3        # --learning_rate_ti 5e-4 x 4
lr_lora = 4e-4          # --learning_rate_unet 1e-4 x 4
lr_embed2 = 1e-4        # --continue_inversion_lr 1e-4, which scale_lr does not touch
lr_lora_text = 4e-5     # --learning_rate_text 1e-5 x 4
clip_ti_decay = True    # --clip_ti_decay: phase-1 placeholder norms pulled toward 0.4
grad_clip_phase1 = False  # clip_grad_norm_ (1.0) only in the phase-2 loop
# LoRA rank 4 on every attention projection (self and cross), the first feed-forward
# projection, and the text encoder's q/k/v/out
lora_targets = lora.OFFICIAL_UNET
lora_text_encoder = True
style_boost = 2.0       # style and composed losses x2 in the first half of each phase
phase2_t_max = 800      # t_mutliplier 0.8 in phase 2, for the reconstruction and the identity pass
lambda_id = 0.25
id_on_source = True     # the identity loss on source samples too (every sample but the style ones)
id_target = "own"       # a source sample's own photo; a composed sample's paired source photo
id_decode_fp32 = True   # x0_hat decoded by the fp32 VAE, clamped to [0, 1]
latent_mask = "nearest" # masks to 64x64 by nearest, then (m + 0.01) / max
hflip = True            # RandomHorizontalFlip with p = 0.5, mask included
color_jitter = 0.1      # ColorJitter(0.1, 0.1): brightness and contrast
# dataset.py's lists (OBJECT_TEMPLATE2, STYLE_PERSON_TEMPLATE2, BOTH_TEMPLATE2); {} <- <v1>, then <v2>
source_templates = ("a photo of a {} person", "the photo of a {} person", "a photo of a clean {} person",
                    "a bright photo of the {} person", "a photo of the {} person", "a good photo of the {} person",
                    "a photo of one {} person", "a photo of a nice {} person", "a good photo of a {} person",
                    "a photo of the nice {} person")
reference_templates = ("a painting of a person in the style of {}", "the painting of a person in the style of {}",
                       "a clean painting of a person in the style of {}", "a picture of a person in the style of {}",
                       "a bright painting of a person in the style of {}",
                       "a good painting of a person in the style of {}", "a nice painting of a person in the style of {}")
# BOTH_TEMPLATE2 is OBJECT_TEMPLATE2 with " in the style of {}" after "person", word for word
composed_templates = tuple(t.replace(" person", " person in the style of {}") for t in source_templates)
