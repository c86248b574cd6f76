# Textual Inversion (Gal et al. 2023) as the paper's baseline (MagiCapture supplement, "Training Details"):
# only the two token embeddings train, with plain (unmasked) reconstruction, <v1> on the source photos and
# <v2> on the reference photos; batch 2 (one source + one reference photo per step); lr 5e-3; 5000 steps.
variant = "fp16"
out_dir = "out/baseline_ti"
phase1_steps = 5000
lr_embed1 = 5e-3
phase2_steps = 0
grad_accum = 1          # each step is one source and one reference photo: the paper's batch of 2
masked = False
lambda_id = 0.0         # phase 2 only, which TI does not have
