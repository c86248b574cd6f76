"""
Score MagiCapture training runs as the paper does (Table 1: CSIM, Style, Aesthetic; Table 3: the same
after post-processing), on a fixed set of images drawn from each run.

    python eval.py --runs=out/portrait                          # <run>/eval/: images, eval.json, sheet.png
    python eval.py --runs=out/portrait,out/portrait_official    # several runs: one table row each (eval.md)
    python eval.py config/eval.py                               # + post-processing, scored before and after

Each run's config.json says what it learned (base model, tokens, composed templates, photo folders,
resolution). The prompts are its first composed prompt, alone and then "with more description" (the
paper's phrase), once per entry of the setting descriptions (", wearing sunglasses", ...); image i uses
prompt i mod (number of prompts) and seed + i. The images are kept in <run>/eval/
(p<prompt>_seed<seed>.png) beside draw.json, the settings that drew them: a second call with the same
settings only scores, other settings redraw, and a draw that was stopped goes on where it stopped.

Writes per run <run>/eval/eval.json (each image's scores; mean and std of each metric; how many images
had no face) and sheet.png (one row per prompt), and for all runs a markdown table, printed and saved
to table_file. The metrics, one function each below: csim, style, aesthetic.
"""

import glob
import hashlib
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import faces
import lora
import model
from configurator import check_choice, check_device, configure

# -----------------------------------------------------------------------------
# command-line settings (read only when run as a script)
runs = "out/magicapture"  # training runs (train.py's out_dir), comma-separated: --runs=out/a,out/b
init_from = ""            # "": each run's own base model; or a repo/folder for all (a run with pipeline/ keeps its own)
num_images = 32           # per run
seed = 0                  # image i uses seed + i
descriptions = ("wearing sunglasses", "smiling", "with a beard")  # appended to the first composed prompt
sampler = "ddim"          # "ddim" or "euler_a"
steps = 50                # paper's evaluation: 50 steps, guidance 7.5
guidance = 7.5
batch_size = 4
lora_scale = 1.0
postprocess = False       # also score each image after Real-ESRGAN + CodeFormer (the paper's Table 3)
upscale_factor = 2        # of the post-processed copy (official inference: 2)
upsampler = "real_esrgan" # the paper's order; "bilinear": the official inference script's (postprocess.enhance)
restore_weight = 0.5      # CodeFormer fidelity (official inference: 0.5)
upscaler_model = ""       # "" takes the file from the Hub repo facefusion/models-3.0.0; or a local .onnx
restorer_model = ""
detector_model = ""
recognizer_model = ""
parser_model = ""
clip_model = "openai/clip-vit-large-patch14"  # CLIP image tower of Style and Aesthetic; or a folder, or "tiny"
aesthetic_repo = "sitatech/aesthetic-predictor-v2"   # a Hub copy of LAION's released predictor weights
aesthetic_file = "sac+logos+ava1-l14-linearMSE.pth"
aesthetic_model = ""      # a local .pth instead (its MD5 is not checked)
table_file = "eval.md"
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "fp16" if torch.cuda.is_available() else "fp32"   # fp32, bf16 or fp16
# -----------------------------------------------------------------------------

AESTHETIC_MD5 = "b1047fd767a00134b8fd6529bf19521a"  # sac+logos+ava1-l14-linearMSE.pth as LAION released it
GREY = 128        # the face region is painted this uint8 level before CLIP sees an image for the Style score
METRICS = ("csim", "style", "aesthetic")
DRAW_FILE = "draw.json"  # in <run>/eval/: the settings that drew the images there

# -----------------------------------------------------------------------------
# the three metrics


def largest_face(image, detector=None):
    """The largest face in an HxWx3 uint8 RGB image (faces.detect, faces.largest), or None if there is none."""
    found = faces.detect(image, detector)
    return faces.largest(found) if found else None


def identity_target(photos, detector=None, recognizer=None):
    """CSIM's reference identity -> (512,) unit vector: the mean of the L2-normalised ArcFace embeddings of
    the largest face in each source photo, normalised again. photos: {name: HxWx3 uint8}; a photo without
    a face raises ValueError naming it (the target would silently be another person's mean otherwise)."""
    embeddings, missing = [], []
    for name, image in photos.items():
        face = largest_face(image, detector)
        if face is None:
            missing.append(name)
        else:
            embeddings.append(faces.embed(image, face, recognizer))
    if missing:
        raise ValueError(f"no face found in the source photo(s) {', '.join(missing)}: CSIM compares each image "
                         "with the identity of every source photo")
    mean = np.mean(embeddings, axis=0)
    return mean / np.linalg.norm(mean)


def csim(image, face, target, recognizer=None):
    """CSIM, the paper's identity score (Table 1): the cosine similarity between the ArcFace embedding of the
    generated image's largest face and the source identity (identity_target).

    face: largest_face(image). An image without a face (None) scores 0, as a choice of this code: averaged
    over only the images with a face, a method that loses the face would not pay for it. The caller counts them."""
    if face is None:
        return 0.0
    return float(faces.embed(image, face, recognizer) @ target)  # both unit length: the dot is the cosine


def without_face(image, face, parser=None):
    """A copy of the HxWx3 uint8 image with its face region painted GREY: the pixels where faces.face_mask
    (the parser's face classes inside the detected box) is over 1/2. Unchanged when face is None."""
    out = image.copy()
    if face is not None:
        out[faces.face_mask(image, face, parser) > 0.5] = GREY
    return out


@torch.no_grad()
def clip_embed(clip, images):
    """(N, D) unit-length CLIP image embeddings of HxWx3 uint8 images (float32, on the CPU); each image is
    prepared alone by model.clip_preprocess (shortest side to the tower's size, centre crop), so sizes may differ."""
    size, weight = clip.config.image_size, clip.visual_projection.weight
    x = torch.cat([model.clip_preprocess(data.to_tensor(im)[None], size) for im in images])
    return F.normalize(clip(x.to(weight.device, weight.dtype)).float(), dim=-1).cpu()


def style(image, face, references, clip, parser=None):
    """Style, the paper's style score (Table 1): the cosine similarity between the CLIP image embeddings of
    the generated image and of a reference photo, both with the face region masked out (without_face: the
    face says who, not which style), averaged over the reference photos.

    face: largest_face(image); with none found, nothing is masked in the image (the caller counts it).
    references: clip_embed(clip, [without_face(reference, its face, parser), ...]), (R, D)."""
    e = clip_embed(clip, [without_face(image, face, parser)])  # (1, D)
    return float((e @ references.T).mean())


class AestheticPredictor(nn.Module):
    """LAION's improved aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE): an MLP from the L2-normalised
    CLIP ViT-L/14 image embedding to a score, about 1 (poor) to 10 (beautiful), fit with MSE to human
    ratings (AVA, Simulacra Aesthetic Captions, LAION-Logos)."""

    def __init__(self, dim=768):
        super().__init__()
        # the checkpoint's keys (layers.0, .2, .4, .6, .7) count LAION's dropout layers (p 0.2, 0.2, 0.1, inactive
        # at inference) at 1, 3, 5: Identity keeps those places. There is no activation anywhere, as released, so
        # the MLP is one affine map in effect.
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Identity(), nn.Linear(1024, 128), nn.Identity(),
                                    nn.Linear(128, 64), nn.Identity(), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embedding):
        """(B, dim) CLIP image embeddings, normalised or not -> (B,) scores."""
        return self.layers(F.normalize(embedding.float(), dim=-1)).squeeze(-1)


def aesthetic(image, clip, predictor):
    """Aesthetic, the paper's image-quality score (Table 1): LAION's aesthetic predictor v2
    (AestheticPredictor) on the image's CLIP ViT-L/14 embedding, the whole image unmasked."""
    e = clip_embed(clip, [image]).to(predictor.layers[0].weight.device)
    return float(predictor(e)[0])

# -----------------------------------------------------------------------------
# the aesthetic predictor's weights


def tensors_digest(paths):
    """sha256 (hex) of the tensors in .safetensors files, by sorted name: the same weights give the same digest,
    whatever order a save wrote their header's metadata in (safetensors does not fix it)."""
    from safetensors.torch import load_file
    h = hashlib.sha256()
    for path in paths:
        tensors = load_file(path)
        for name in sorted(tensors):
            h.update(name.encode())
            h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_digest(paths, kind):
    """hashlib digest (hex) of the files' bytes, read in 1 MiB pieces, one after the other."""
    h = hashlib.new(kind)
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def aesthetic_weights(local, repo, name, md5=AESTHETIC_MD5):
    """Path of the aesthetic predictor's .pth: `local` if given (not hash-checked, as it may be any copy),
    else repo/name from the Hugging Face cache or the Hub, whose MD5 must be `md5`. Raises faces.MissingModel
    when the Hub copy is neither cached nor downloadable, at once (no retries), with the command that fetches it."""
    if local:
        if not os.path.isfile(local):
            raise FileNotFoundError(f"aesthetic_model={local}: no such file")
        print(f"aesthetic predictor {local} (a local file: its MD5 is not checked)")
        return local
    try:
        path = model.hub_file(repo, name)
    except OSError as err:
        raise faces.MissingModel(
            f"{name} (the aesthetic predictor) is not in the Hugging Face cache and cannot be downloaded from "
            f"the Hub repo {repo} ({err}). Fetch it where there is network with `hf download {repo} {name} "
            f"--local-dir DIR` (copy DIR here if that is another machine) and pass --aesthetic_model=DIR/{name}.") from None
    got = file_digest([path], "md5")
    if got != md5:
        raise RuntimeError(f"{path}: MD5 {got} is not that of the released {name} ({md5}): the download is "
                           "corrupt or incomplete, or the file changed in the repo. Delete it from the Hugging Face "
                           "cache and run again, or pass a copy you trust with --aesthetic_model=PATH.")
    return path


def load_aesthetic(path, device="cpu"):
    """AestheticPredictor with the weights of the state-dict .pth at `path`; its input width is the file's."""
    try:  # weights_only: tensors and containers only; a .pth is a pickle, which could otherwise run code
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a state dict of tensors ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict) or "layers.0.weight" not in sd:
        raise ValueError(f"{path}: no layers.0.weight; expected the state dict of LAION's aesthetic predictor "
                         "(layers.0, .2, .4, .6, .7)")
    predictor = AestheticPredictor(sd["layers.0.weight"].shape[1])
    try:
        predictor.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: {e}") from None
    return predictor.to(device).eval().requires_grad_(False)

# -----------------------------------------------------------------------------
# runs: prompts, cached images, scores, the table


def read_run(run):
    """The run's config.json; SystemExit naming the file when the folder is not a finished training run."""
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: --runs takes training runs' folders (train.py's out_dir, holding "
                         f"config.json and {lora.EMBEDS_FILE})")
    if not os.path.isfile(os.path.join(run, lora.EMBEDS_FILE)):
        raise SystemExit(f"{run} has no {lora.EMBEDS_FILE}: train.py writes the run's weights when it ends; "
                         "finish the run (--resume) or leave it out of --runs")
    with open(path) as f:
        cfg = json.load(f)
    needed = ("init_from", "tokens", "composed_templates", "source_dir", "reference_dir", "resolution")
    missing = [k for k in needed if k not in cfg]
    if missing:
        raise SystemExit(f"{path} lacks {', '.join(missing)}: not a config.json written by train.py")
    if cfg.get("subject", "face") != "face":
        raise SystemExit(f"{run} learned an object (subject={cfg['subject']!r}): CSIM, Style and Aesthetic score "
                         "portraits; leave it out of --runs")
    if cfg.get("save_pipeline") and not os.path.isdir(os.path.join(run, "pipeline")):
        raise SystemExit(f"{run} fine-tuned the whole model (save_pipeline), but {os.path.join(run, 'pipeline')} "
                         "is missing: the run did not finish writing it; finish it with train.py's --resume")
    for k in ("source_dir", "reference_dir"):
        if not os.path.isdir(cfg[k]):
            raise SystemExit(f"{path}: {k}={cfg[k]} is not a folder here. CSIM and Style compare with the run's "
                             "photos; a relative path counts from the folder eval.py runs in, so run it where "
                             "train.py ran")
    if "photos" in cfg:  # what the run trained on (train.py records each photo's SHA-256): the scores compare with it
        now = data.digests({k: [p for p, _ in data.list_images(cfg[f"{k}_dir"])] for k in ("source", "reference")})
        if now != cfg["photos"]:
            raise SystemExit(f"{run}: the photos in its source_dir and reference_dir differ from those it trained on "
                             "(config.json):\n" + "\n".join(data.digest_changes(cfg["photos"], now)) + "\nCSIM and "
                             "Style compare with the run's photos: put them back")
    return cfg


def eval_prompts(cfg, descriptions):
    """The run's first composed prompt (the one its validation draws), alone and with each description appended:
    the same protocol, and as many prompts, for every run, whatever its number of templates."""
    composed = cfg["composed_templates"][0].format(*cfg["tokens"])
    return [composed] + [f"{composed}, {d}" for d in descriptions]


def as_json(value):
    """value as it reads back from a json file (tuples become lists), so settings compare equal after a round trip."""
    return json.loads(json.dumps(value))


def read_draw_file(folder):
    path = os.path.join(folder, DRAW_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # none yet, or one a kill cut short: nothing counts as drawn
        return {}


def cached(folder, key, settings, files):
    """True when `folder`'s DRAW_FILE records `settings` under `key` and every file is there."""
    return (read_draw_file(folder).get(key) == as_json(settings)
            and all(os.path.isfile(os.path.join(folder, f)) for f in files))


def remember(folder, key, settings):
    """Record in DRAW_FILE that the files of `key` were made with `settings`; None forgets them."""
    record = read_draw_file(folder)
    record[key] = as_json(settings)
    data.write_whole(os.path.join(folder, DRAW_FILE), json.dumps(record, indent=2))


def summary(records):
    """Mean and std (population, ddof 0) of each metric over the images, and how many had no face."""
    out = {m: dict(mean=float(np.mean([r[m] for r in records])), std=float(np.std([r[m] for r in records])))
           for m in METRICS}
    return dict(out, faces_not_found=sum(not r["face_found"] for r in records), images=records)


def markdown_table(rows):
    """rows: [(method, summary)] -> the paper's Table 1 layout, each metric as mean ± std."""
    lines = ["| method | CSIM | Style | Aesthetic | no face |", "|---|---|---|---|---|"]
    for method, s in rows:
        cells = [f"{s[m]['mean']:.3f} ± {s[m]['std']:.3f}" for m in METRICS]
        lines.append(f"| {method} | {' | '.join(cells)} | {s['faces_not_found']} of {len(s['images'])} |")
    return "\n".join(lines) + "\n"


def contact_sheet(images, prompt_index, prompts, path):
    """One row per prompt, its images in seed order (white where a row is short), the prompt above it."""
    cols = max(prompt_index.count(p) for p in set(prompt_index))
    tiles, labels = [], []
    for p, text in enumerate(prompts):
        row = [data.to_tensor(im) for im, i in zip(images, prompt_index) if i == p]
        if row:
            tiles += row + [torch.ones_like(row[0])] * (cols - len(row))
            labels.append(f"{p}: {text}")
    data.save_labeled_grid(torch.stack(tiles), cols, labels, path)


def read_images(folder, files):
    return [np.asarray(data.read_rgb(os.path.join(folder, f))) for f in files]


def base_model(run, cfg):
    """(model, variant) a run's images are drawn from: its own fine-tuned pipeline if it wrote one (DreamBooth:
    <run>/pipeline; read_run checks it is there), else the init_from setting if given, else the model it
    trained on."""
    if cfg.get("save_pipeline"):
        return os.path.join(run, "pipeline"), None
    return init_from or cfg["init_from"], cfg.get("variant")


def draw_images(cfg, run, prompts, prompt_index, seeds, folder, files):
    """The run's images, (H, W, 3) uint8 each, each saved as drawn to folder/files[i]: its base model with its
    tokens and LoRA (merged), one generator per image so that image i is the same whatever the batch size; the
    images already in the folder (a draw that was stopped) are kept, not drawn again."""
    todo = [i for i, f in enumerate(files) if not os.path.isfile(os.path.join(folder, f))]
    if len(todo) < len(files):
        print(f"{run}: {len(files) - len(todo)} of the {len(files)} images were drawn before a stop; drawing the rest")
    if not todo:
        return read_images(folder, files)
    base, variant = base_model(run, cfg)
    sd = model.StableDiffusion.from_pretrained(base, device=device, dtype=model.DTYPES[dtype], variant=variant)
    lora.load_result(sd, run, scale=lora_scale)
    lora.merge(sd.unet, sd.text_encoder, sd.text_encoder_2)
    try:  # CLIP reads 77 tokens: a placeholder past them would silently drop out of the prompt
        sd.tokenizer.check_length(prompts)
    except ValueError as e:
        raise SystemExit(f"{run}: {e}")
    R = cfg["resolution"]
    name = os.path.basename(os.path.normpath(run))
    for b in tqdm(range(0, len(todo), batch_size), desc=f"drawing {name}", unit="batch"):
        chunk = todo[b:b + batch_size]
        latents = torch.cat([torch.randn(1, sd.vae.config.latent_channels, R // 8, R // 8,
                                         generator=torch.Generator().manual_seed(seeds[i])) for i in chunk])
        out = sd.sample([prompts[prompt_index[i]] for i in chunk], steps=steps, guidance=guidance,
                        seed=[seeds[i] for i in chunk], latents=latents, height=R, width=R, sampler=sampler)
        for i, im in zip(chunk, out):
            data.save_png(im.cpu(), os.path.join(folder, files[i]))  # whole, then renamed
    return read_images(folder, files)


def score_images(images, target, references, clip, predictor, models):
    """Per image: face_found and the three metrics. models: the face model paths (detector, recognizer, parser)."""
    records = []
    for image in tqdm(images, desc="scoring", unit="image"):
        face = largest_face(image, models["detector"])
        records.append(dict(face_found=face is not None, csim=csim(image, face, target, models["recognizer"]),
                            style=style(image, face, references, clip, models["parser"]),
                            aesthetic=aesthetic(image, clip, predictor)))
    return records


def run_images(run, cfg, folder, prompts, prompt_index, seeds, models):
    """{kind: [file names]} and {kind: [HxWx3 uint8 images]} of the run in `folder`: "plain", drawn or reused,
    and with postprocess "enhanced" (postprocess.enhance of each), made or reused."""
    files = {"plain": [f"p{p}_seed{s}.png" for p, s in zip(prompt_index, seeds)]}
    weights = [os.path.join(run, f) for f in (lora.EMBEDS_FILE, lora.LORA_FILE, lora.WEIGHTS_FILE)
               if os.path.isfile(os.path.join(run, f))]
    base, variant = base_model(run, cfg)
    # a local model folder by its weight files' sizes and times (hashing a pipeline's gigabytes each call would
    # cost more than it saves): a DreamBooth run trained again draws anew
    local = sorted(glob.glob(os.path.join(base, "*", "*.safetensors"))) if os.path.isdir(base) else []
    draw = dict(init_from=base, variant=variant, weights_sha256=tensors_digest(weights),
                base_files=[(os.path.relpath(f, base), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in local],
                prompts=prompts, seeds=seeds, sampler=sampler,
                steps=steps, guidance=guidance, lora_scale=lora_scale, resolution=cfg["resolution"], device=device,
                dtype=dtype)
    if cached(folder, "plain", draw, files["plain"]):
        print(f"{run}: the images in {folder} were drawn with these settings; scoring them again")
        images = {"plain": read_images(folder, files["plain"])}
    else:
        if read_draw_file(folder).get("drawing") != as_json(draw):  # not a stopped draw of these settings
            for stale in ("eval.json", "sheet_enhanced.png"):  # of the images about to go
                if os.path.exists(os.path.join(folder, stale)):
                    os.remove(os.path.join(folder, stale))
            for old in glob.glob(os.path.join(folder, "p*_seed*.png")):  # another setting's images: none may stay
                os.remove(old)
            for key in ("enhanced", "enhancing", "plain"):
                remember(folder, key, None)
            remember(folder, "drawing", draw)  # what the images saved from here on are drawn with
        images = {"plain": draw_images(cfg, run, prompts, prompt_index, seeds, folder, files["plain"])}
        remember(folder, "plain", draw)
        remember(folder, "drawing", None)
    if postprocess:
        from postprocess import enhance
        files["enhanced"] = [f.replace(".png", "_enhanced.png") for f in files["plain"]]
        enhanced = dict(draw, upscale_factor=upscale_factor, upsampler=upsampler, restore_weight=restore_weight,
                        upscaler_model=upscaler_model, restorer_model=restorer_model, detector_model=detector_model)
        if not cached(folder, "enhanced", enhanced, files["enhanced"]):
            if read_draw_file(folder).get("enhancing") != as_json(enhanced):  # not a stopped pass of these settings
                for old in glob.glob(os.path.join(folder, "p*_seed*_enhanced.png")):
                    os.remove(old)
                remember(folder, "enhanced", None)
                remember(folder, "enhancing", enhanced)  # what the images saved from here on are made with
            for f, im in zip(files["enhanced"], tqdm(images["plain"], desc="post-processing", unit="image")):
                if not os.path.isfile(os.path.join(folder, f)):  # each saved as made: a stop keeps them
                    better = enhance(im, upscale_factor, restore=True, weight=restore_weight,
                                     upscaler=models.get("upscaler"), restorer=models["restorer"],
                                     detector=models["detector"], upsampler=upsampler)
                    data.save_png(torch.from_numpy(better).permute(2, 0, 1) / 255.0, os.path.join(folder, f))
            remember(folder, "enhanced", enhanced)
            remember(folder, "enhancing", None)
        images["enhanced"] = read_images(folder, files["enhanced"])
    return files, images


def score_references(run, cfg, clip, models):
    """What the scores compare with: the source identity (identity_target) and the reference photos' CLIP
    embeddings with their faces masked out; also the references in which no face was found."""
    try:
        sources = {p.path: np.asarray(p.photo) for p in data.load_folder(cfg["source_dir"], min_images=1)}
        target = identity_target(sources, models["detector"], models["recognizer"])
    except ValueError as e:
        raise SystemExit(f"{run}: {e}")
    photos = {p.path: np.asarray(p.photo) for p in data.load_folder(cfg["reference_dir"], min_images=1)}
    found = {name: largest_face(im, models["detector"]) for name, im in photos.items()}
    references = clip_embed(clip, [without_face(im, found[name], models["parser"]) for name, im in photos.items()])
    no_face = [name for name, face in found.items() if face is None]
    if no_face:
        print(f"{run}: no face found in reference photo(s) {', '.join(no_face)}: nothing masked in them for Style")
    return target, references, no_face


def run_names(runs):
    """Each run's name in the table: its folder's name, with as many parent folders as it takes to tell the runs
    apart (study.py's runs, <config>/<pair>, all end in the pair's name)."""
    parts = [os.path.normpath(run).split(os.sep) for run in runs]
    names = []
    for p in parts:
        k = 1
        while k < len(p) and sum(q[-k:] == p[-k:] for q in parts) > 1:
            k += 1
        names.append("/".join(p[-k:]))
    return names


def evaluate_run(run, method, cfg, clip, predictor, models, compared):
    """Draw (or reuse) the run's images, score them against `compared` (score_references' result), write
    eval.json and the contact sheets; returns the table rows [(method, summary)]: the run's, and with
    postprocess method + postprocessing."""
    folder = os.path.join(run, "eval")
    os.makedirs(folder, exist_ok=True)
    prompts = eval_prompts(cfg, descriptions)
    prompt_index = [i % len(prompts) for i in range(num_images)]
    seeds = [seed + i for i in range(num_images)]
    files, images = run_images(run, cfg, folder, prompts, prompt_index, seeds, models)
    target, references, no_face = compared
    result = dict(run=run, prompts=prompts, settings=config, references_without_face=no_face)
    rows = []
    for kind in files:
        records = score_images(images[kind], target, references, clip, predictor, models)
        for r, f, p, s in zip(records, files[kind], prompt_index, seeds):
            r.update(file=f, prompt=p, seed=s)
        result[kind] = summary(records)
        rows.append((method if kind == "plain" else f"{method} + postprocessing", result[kind]))
        contact_sheet(images[kind], prompt_index, prompts,
                      os.path.join(folder, "sheet.png" if kind == "plain" else "sheet_enhanced.png"))
    with open(os.path.join(folder, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    for name, s in rows:
        print(f"{name}: " + ", ".join(f"{m} {s[m]['mean']:.3f} ± {s[m]['std']:.3f}" for m in METRICS)
              + f"; no face in {s['faces_not_found']} of {len(s['images'])} images")
    print(f"wrote {os.path.join(folder, 'eval.json')}")
    return rows

# -----------------------------------------------------------------------------


if __name__ == "__main__":
    config = configure(globals())
    check_choice("dtype", dtype, model.DTYPES)
    check_choice("sampler", sampler, ("ddim", "euler_a"))
    device = check_device(device)
    if not (num_images >= 1 and batch_size >= 1 and steps >= 1):
        raise SystemExit(f"num_images, batch_size and steps must be >= 1, got {num_images}, {batch_size}, {steps}")
    run_dirs = list(dict.fromkeys(os.path.normpath(r.strip()) for r in runs.split(",") if r.strip()))  # once each
    if not run_dirs:
        raise SystemExit("no run given: --runs=out/a (or --runs=out/a,out/b for a table of several)")
    run_configs = {run: read_run(run) for run in run_dirs}  # every run checked before any model loads
    for run, cfg in run_configs.items():  # and its diffusion model found (or fetched) before any is drawn
        try:
            model.StableDiffusion.locate(*base_model(run, cfg))
        except (FileNotFoundError, RuntimeError) as e:
            raise SystemExit(f"{run}: {e}")
    chosen = dict(detector=detector_model or None, recognizer=recognizer_model or None, parser=parser_model or None)
    try:  # every file found (or fetched) before the first image is drawn, the missing ones named together
        if postprocess:  # with the files postprocess.enhance will run with these settings (its upscaler, restorer)
            from postprocess import find_models
            models = find_models(upscale_factor, True, upscaler_model or None, restorer_model or None,
                                 detector_model or None, upsampler=upsampler, weight=restore_weight, also=chosen)
        else:
            models = faces.model_paths(chosen)
        predictor = load_aesthetic(aesthetic_weights(aesthetic_model, aesthetic_repo, aesthetic_file), device)
        clip = model.CLIPVisionModel.from_pretrained(clip_model, device=device, dtype=model.DTYPES[dtype])
    except (faces.MissingModel, FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(str(e))
    width = predictor.layers[0].in_features
    if width != clip.config.projection_dim:
        raise SystemExit(f"the aesthetic predictor reads {width}-wide CLIP embeddings, but clip_model={clip_model} "
                         f"makes {clip.config.projection_dim}-wide ones: LAION's predictor needs CLIP ViT-L/14 "
                         "(openai/clip-vit-large-patch14)")
    # every run's photos read and checked (a source without a face stops) before the first image is drawn
    compared = {run: score_references(run, run_configs[run], clip, models) for run in run_dirs}
    rows = [row for run, name in zip(run_dirs, run_names(run_dirs))
            for row in evaluate_run(run, name, run_configs[run], clip, predictor, models, compared[run])]
    table = markdown_table(rows)
    print("\n" + table)
    with open(table_file, "w") as f:
        f.write(table)
    print(f"wrote {table_file}")
