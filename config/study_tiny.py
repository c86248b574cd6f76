# study.py's whole default grid (MagiCapture, the three baselines, the three ablations) on the tiny random pipeline
# and the drawn data set (one pair), on a CPU in a few minutes: it proves the grid trains, resumes and tabulates,
# not anything about the methods. step_scale 0.002 makes each run a handful of steps: Textual Inversion 5000 -> 10,
# DreamBooth 2000 -> 4, Custom Diffusion 750 -> 2, MagiCapture and its ablations 1200 + 1500 -> 2 + 3.
# Not evaluated: eval.py needs the face models (detector, ArcFace, parser: from the Hub, or local .onnx files) and
# an aesthetic predictor as wide as the CLIP tower (LAION's reads ViT-L/14's 768, not the tiny tower's). Where the
# real ones can be had, --evaluate=True --eval_args="--num_images=2 --steps=2" scores the runs as well.
pairs = "drawn=out/study_tiny-data/source:out/study_tiny-data/reference"
out_dir = "out/study_tiny"
train_args = ("--init_from=tiny --variant=None --synthetic_data=True --resolution=64 --attn_resolutions=(4,) "
              "--eval_steps=2 --device=cpu --dtype=fp32 --prior_images=2 --lambda_id=0")
step_scale = 0.002
evaluate = False
