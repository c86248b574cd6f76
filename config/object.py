# The supplement's general-object mode ("General Object", eq. 11): <v1> is an object's structure, learned from
# its photos (masked by <name>_mask.png, white = the object; without one the whole photo counts), <v2> a texture
# or style learned from the reference photos, unmasked; the composed prompt is trained through DINO ViT-B/8
# (facebook/dino-vitb8) losses on x0_hat: 0.1 self-similarity + 0.2 patch contrast (to the source photo) + 2 style
# ([CLS], to the reference photo), train.py's defaults for lambda_ssim, lambda_contra, lambda_style.
# Put 4-6 photos of the object in data/object and 4-6 reference photos in data/texture; replace "object" in the
# prompts by its class word (a toy, a mug, a car): the class word helps the model place it.
variant = "fp16"
out_dir = "out/object"
source_dir = "data/object"
reference_dir = "data/texture"
subject = "object"
lambda_id = 0.0
source_templates = ("a photo of {} object", "a close-up photo of {} object", "a good photo of {} object")
reference_templates = ("a photo in the {} style", "a picture in the {} style", "an image in the {} style")
composed_templates = ("a photo of {} object in the {} style", "a picture of {} object in the {} style",
                      "an image of {} object in the {} style")
neutral_prompt = "a photo of an object"
