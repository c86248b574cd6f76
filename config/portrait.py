# The paper's settings (MagiCapture, AAAI 2024, Sec. 4 and the supplement) on Stable Diffusion 1.5.
# train.py's defaults are the paper's numbers (phase 1: 1200 steps at lr 5e-4; phase 2: 1500 steps,
# LoRA lr 1e-4, embeddings lr 1e-5; batch 1 x accumulation 4; lambda_attn 2.5, lambda_id 1.0), so this
# file only says where the photos are and where the run goes. One 24 GB GPU, as in the paper.
# Put 4-6 photos of the person in data/source and 4-6 photos of the style in data/reference.
variant = "fp16"        # half-size download; training computes in bf16 with fp32 trainable weights
out_dir = "out/portrait"
