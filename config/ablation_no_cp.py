# The paper's ablation "w/o CP" (Table 3): MagiCapture without composed prompt learning (no eq. 6 term, and so
# no composed prompt in attention refocusing or the identity loss); everything else as config/portrait.py.
variant = "fp16"
out_dir = "out/ablation_no_cp"
composed = False
