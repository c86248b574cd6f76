# The general-object mode's mechanics on a CPU in a few minutes, on top of config/tiny.py:
#   python train.py config/tiny.py config/tiny_object.py
# a drawn toy as the object, drawn checkered textures as the reference, a tiny random DINO ViT. Proves the
# code runs and the eq. 11 terms are computed and logged, not image quality.
source_dir = "out/tiny_object-data/source"
reference_dir = "out/tiny_object-data/reference"
out_dir = "out/tiny_object"
subject = "object"
dino_model = "tiny"
dino_size = 32
source_templates = ("a photo of {} toy",)
reference_templates = ("a picture in the {} style",)
composed_templates = ("a photo of {} toy in the {} style",)
neutral_prompt = "a photo of a toy"
