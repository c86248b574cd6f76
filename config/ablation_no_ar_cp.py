# The paper's ablation "w/o AR & CP" (Table 3): neither attention refocusing (eq. 8) nor composed prompt
# learning (eq. 6); else as config/portrait.py.
variant = "fp16"
out_dir = "out/ablation_no_ar_cp"
lambda_attn = 0.0
composed = False
