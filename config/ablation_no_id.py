# Ablation: MagiCapture without the identity loss (eq. 7); else as config/portrait.py.
variant = "fp16"
out_dir = "out/ablation_no_id"
lambda_id = 0.0
