# Score the paper's and the official script's settings side by side, as the paper's Tables 1 and 3 do:
# CSIM, Style and Aesthetic on each run's images, before and after post-processing (Real-ESRGAN x2, then
# CodeFormer at weight 0.5). eval.py's defaults sample as the paper's evaluation: 50 steps, guidance 7.5.
# python train.py config/portrait.py && python train.py config/portrait_official.py && python eval.py config/eval.py
runs = "out/portrait,out/portrait_official"
postprocess = True
