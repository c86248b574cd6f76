# The paper's settings (MagiCapture, AAAI 2024, Sec. 4 and the supplement) on Stable Diffusion 1.5.
# Put 4-6 photos of the person in data/source and 4-6 photos of the style in data/reference,
# each with <name>_mask.png (white = face). One 24 GB GPU, as in the paper.
init_from = "stable-diffusion-v1-5/stable-diffusion-v1-5"
variant = "fp16"
source_dir = "data/source"
reference_dir = "data/reference"
out_dir = "out/portrait"
resolution = 512
phase1_steps = 1200     # paper: textual inversion, lr 5e-4
lr_embed1 = 5e-4
phase2_steps = 1500     # paper: LoRA lr 1e-4, embeddings lr 1e-5
lr_lora = 1e-4
lr_embed2 = 1e-5
lora_rank = 4
lora_alpha = 4.0        # W' = W + U V^T: no extra scaling
grad_accum = 4          # paper: batch 1, gradient accumulation 4
lambda_attn = 2.5       # paper
lambda_id = 1.0         # paper (0.25 and 0.5 also fine)
attn_resolutions = (16,)
dtype = "bf16"
eval_interval = 250
ckpt_interval = 250
