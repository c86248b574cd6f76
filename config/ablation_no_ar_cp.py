# The paper's ablation "w/o AR & CP" (Table 3): neither attention refocusing (eq. 8) nor composed prompt
# learning (eq. 6, and with it eq. 7, the composed sample's identity loss); else as config/portrait.py.
variant = "fp16"
batch_size = 4          # one pass of the batch of 4 (smaller passes where it does not fit), as config/portrait.py
grad_accum = 1
out_dir = "out/ablation_no_ar_cp"
lambda_attn = 0.0
composed = False
lambda_id = 0.0
