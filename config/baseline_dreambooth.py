# DreamBooth (Ruiz et al. 2023) as the paper's baseline (MagiCapture supplement, "Training Details"): the whole
# UNet and text encoder train, with prior preservation (lambda 1.0, 200 class images); batch 2 (one source + one
# style image per step); lr 1e-6; 2000 steps. Writes out_dir/pipeline, the fine-tuned model in the diffusers
# layout: python sample.py --init_from=out/baseline_dreambooth/pipeline --lora=out/baseline_dreambooth ...
variant = "fp16"
out_dir = "out/baseline_dreambooth"
phase1_steps = 0
phase2_steps = 2000
grad_accum = 1
lora_targets = ()
full_targets = (r"unet\..*", r"text_encoder\..*")
lr_full = 1e-6
lr_embed2 = 1e-6        # <v1> and <v2> are rows of the text encoder's table: its rate
save_pipeline = True
masked = False
composed = False
lambda_attn = 0.0
lambda_id = 0.0
prior_prompt = "a photo of a person"
prior_images = 200
lambda_prior = 1.0
gradient_checkpointing = True   # fp32 master weights of 982 M parameters + AdamW: about 16 GB before activations
ckpt_interval = 500     # a checkpoint holds the whole UNet and text encoder with their AdamW state (about 12 GB)
keep_checkpoints = 1
