# The mechanics of both phases, end to end on a CPU in a few minutes: the tiny random
# pipeline (model.py's StableDiffusion.tiny, SD1.5's architecture at small width) and a
# drawn data set. It proves the code runs and the losses move, not image quality.
init_from = "tiny"
source_dir = "out/tiny-data/source"
reference_dir = "out/tiny-data/reference"
synthetic_data = True
out_dir = "out/tiny"
resolution = 128                 # latents 16x16: feature maps 16, 8, 4, 2 (SD1.5 at 512 px: 64, 32, 16, 8)
attn_resolutions = (8,)
lambda_id = 0.0
phase1_steps = 40
phase2_steps = 80
grad_accum = 1
lr_embed1 = 5e-3
lr_lora = 3e-3
lr_embed2 = 1e-4
device = "cpu"
dtype = "fp32"
log_interval = 5
eval_interval = 40
eval_steps = 10
ckpt_interval = 40
