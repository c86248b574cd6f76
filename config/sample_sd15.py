# Sample from the official SD1.5 weights (about 2 GB of fp16 files, downloaded once to the Hugging Face cache).
init_from = "stable-diffusion-v1-5/stable-diffusion-v1-5"
variant = "fp16"
steps = 50
guidance = 7.5
num_samples = 4
out_dir = "out/samples-sd15"
