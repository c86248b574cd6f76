# The paper's ablation "w/o CP" (Table 3): MagiCapture without composed prompt learning: no eq. 6 term, no
# composed prompt in attention refocusing, and no identity loss (eq. 7 is the composed sample's, the paper's
# "auxiliary identity loss" of CP); everything else as config/portrait.py.
variant = "fp16"
batch_size = 4          # one pass of the batch of 4 (smaller passes where it does not fit), as config/portrait.py
grad_accum = 1
out_dir = "out/ablation_no_cp"
composed = False
lambda_id = 0.0
