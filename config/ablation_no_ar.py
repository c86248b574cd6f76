# The paper's ablation "w/o AR": MagiCapture without attention refocusing (eq. 8); else as config/portrait.py.
variant = "fp16"
batch_size = 4          # one pass of the batch of 4 (smaller passes where it does not fit), as config/portrait.py
grad_accum = 1
out_dir = "out/ablation_no_ar"
lambda_attn = 0.0
