# Custom Diffusion (Kumari et al. 2023) as the paper's baseline (MagiCapture supplement, "Training Details"): the
# cross-attention key and value projections (attn2.to_k, attn2.to_v) train in full, with the two token embeddings;
# prior preservation (lambda 1.0, 200 class images); batch 2; lr 5e-6; 750 steps. Writes the changed weights to
# out_dir/trained_weights.safetensors (sample.py --lora and eval.py apply them).
variant = "fp16"
out_dir = "out/baseline_custom_diffusion"
phase1_steps = 0
phase2_steps = 750
grad_accum = 1
lora_targets = ()
full_targets = (r"unet\..*attn2\.to_[kv]\.weight",)
lr_full = 5e-6
lr_embed2 = 5e-6
masked = False
composed = False
lambda_attn = 0.0
lambda_id = 0.0
prior_prompt = "a photo of a person"
prior_images = 200
lambda_prior = 1.0
