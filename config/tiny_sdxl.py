# MagiCapture on SDXL's architecture, end to end on a CPU in a few minutes, on top of config/tiny.py:
#   python train.py config/tiny.py config/tiny_sdxl.py
# model.py's StableDiffusion.tiny_xl: two text encoders (the tokens are learned in both), the pooled-text and
# size conditioning, a top level without attention. Proves the code runs, not image quality.
init_from = "tiny-xl"
out_dir = "out/tiny_sdxl"
attn_resolutions = (8,)          # 128 px: latents 16, feature maps 16 (no attention), 8, 4
