# Draw as the official MagiCapture inference script does (inference_magicapture.py): its prompt,
# Euler ancestral, 50 steps, guidance 7, LoRA scale 0.6 on the UNet and 0.9 on the text encoder,
# then CodeFormer (w 0.5) with a 2x upscale as its CodeFormer helper runs without a background
# upsampler: faces restored at 512 px, pasted into a bilinear enlargement through a parsing mask.
# python sample.py config/sample_official.py --lora=out/portrait_official
init_from = "stable-diffusion-v1-5/stable-diffusion-v1-5"
variant = "fp16"
prompt = "a photo of a <v1> person with style <v2>"  # official: "A photo of a <sks> person with style <style1>"
sampler = "euler_a"
steps = 50
guidance = 7.0
lora_scale = 0.6
lora_scale_text = 0.9
postprocess = True
upscale_factor = 2
restore_weight = 0.5
upsampler = "bilinear"
restore_parse = True
out_dir = "out/samples-official"
