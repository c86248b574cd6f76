# MagiCapture on SDXL base 1.0 at 1024 px: the paper's recipe (train.py's defaults) with SDXL's sizes.
#   python train.py config/portrait_sdxl.py --source_dir=me --reference_dir=style
# The tokens are learned in both text encoders; LoRA sits on the UNet's cross-attention projections, as on SD1.5.
init_from = "stabilityai/stable-diffusion-xl-base-1.0"
variant = "fp16"                 # half-size download; training computes in bf16 (SDXL's VAE overflows in fp16)
resolution = 1024
attn_resolutions = (32,)         # eq. 8 where SD1.5 at 512 px reads 16x16, a quarter of the latent side: 128 -> 32,
                                 # down_blocks.2, the mid block and up_blocks.0 (6 modules of 10 transformer blocks)
gradient_checkpointing = True    # the UNet's blocks and the identity loss's decode at 1024 px (eq. 7) recompute
                                 # their activations in the backward pass instead of storing them
out_dir = "out/portrait_sdxl"
