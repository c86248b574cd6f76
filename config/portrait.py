# The paper's settings (MagiCapture, AAAI 2024, Sec. 4 and the supplement) on Stable Diffusion 1.5.
# train.py's defaults are the paper's numbers (phase 1: 1200 steps at lr 5e-4; phase 2: 1500 steps,
# LoRA lr 1e-4, embeddings lr 1e-5; batch 1 x accumulation 4; lambda_attn 2.5, lambda_id 1.0), so this
# file only says where the photos are, where the run goes, and how a step's 4 draws are run. One 24 GB GPU,
# as in the paper.
# Put 4-6 photos of the person in data/source and 4-6 photos of the style in data/reference.
variant = "fp16"        # half-size download; training computes in bf16 with fp32 trainable weights
batch_size = 4          # the paper's batch of 4 as one UNet pass, not 4 micro-steps of 1: the same draws and
grad_accum = 1          # expected update, in about half the time. Where a pass of 4 runs out of GPU memory,
                        # train.py redoes it as 2 passes of 2, then 4 of 1 (--batch_size=1 --grad_accum=4)
out_dir = "out/portrait"
