# Ablation: MagiCapture without the identity loss (eq. 7); else as config/portrait.py.
variant = "fp16"
batch_size = 4          # one pass of the batch of 4 (smaller passes where it does not fit), as config/portrait.py
grad_accum = 1
out_dir = "out/ablation_no_id"
lambda_id = 0.0
