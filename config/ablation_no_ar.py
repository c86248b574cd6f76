# The paper's ablation "w/o AR": MagiCapture without attention refocusing (eq. 8); else as config/portrait.py.
variant = "fp16"
out_dir = "out/ablation_no_ar"
lambda_attn = 0.0
