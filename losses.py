"""
The MagiCapture losses as plain tensor functions, one per equation of the
paper (Hyung et al., AAAI 2024). Nothing here knows about models: the caller
runs the UNet, records the attention maps and resizes the masks.
"""

import torch
import torch.nn.functional as F


def masked_mse(pred, target, mask):
    """Eq. 4-6: || eps*M - eps_theta*M ||^2, taken as a mean over the mask.

    pred, target: (B, C, h, w); mask: (B, 1, h, w) in [0, 1] at latent size.
    The official code rescales the plain MSE by area / mask sum, which makes
    it a mean over the masked pixels (and channels), so small faces weigh as
    much as large ones. Each sample is averaged over its own mask, then the
    batch is averaged. A sample with an all-zero mask has nothing to learn
    from: it contributes 0 loss and 0 gradient (not NaN).
    """
    sq = (pred.float() * mask - target.float() * mask) ** 2  # (B, C, h, w)
    area = mask.sum(dim=(1, 2, 3)) * pred.shape[1]  # masked elements per sample
    # the numerator is exactly 0 when the mask is empty, so any positive floor works
    per_sample = sq.sum(dim=(1, 2, 3)) / area.clamp_min(1e-8)
    return per_sample.mean()


def identity_loss(emb, emb_ref):
    """Eq. 7: L_id = 1 - cos(R(B(x0_hat)), R(B(I_s))), per sample (x0_hat: model.py's Schedule.predict_x0).

    emb, emb_ref: (B, D) face embeddings (ArcFace), not necessarily normalised. Returns (B,): the
    caller weighs each sample into eq. 10 (total_loss). Same value as the official torch
    CosineEmbeddingLoss with target 1.
    """
    return 1 - F.cosine_similarity(emb, emb_ref, dim=-1)


def total_loss(recon, attn, ident, weight, lambda_attn, lambda_id):
    """Eq. 10, weighted as the official script's steps add it up: each task x (source, reference or
    composed sample) contributes weight_x * L_x + lambda_attn * L_attn,x + lambda_id * L_id,x, and the
    tasks of a batch are averaged:

        L = (1 / N) sum_x [ w_x L_x + lambda_attn A_x + lambda_id I_x ]

    recon, attn, ident, weight: (N,) per task; attn and ident are 0 for a task without the term (no
    attention refocusing in phase 1, no identity loss on a reference sample or where no face was found).
    The official script draws one task per step and adds exactly that task's three terms, with the paper's
    lambda_attn 2.5 and lambda_id tuned for it; the mean over tasks keeps those relative weights for a
    batch that holds one of each. weight: the official style_boost (x2 on the reference and composed
    reconstruction in each phase's first half), 1 otherwise.
    """
    return (weight * recon + lambda_attn * attn + lambda_id * ident).mean()


def _scaled_maps(maps, size):
    """Upsample each map to `size` and min-max scale it to [0, 1] per (batch, head, token).

    maps: list of (B, heads, h, w, K); returns (B, L*heads, K, H, W).
    """
    out = []
    for a in maps:
        B, nh, h, w, K = a.shape
        a = a.float().permute(0, 1, 4, 2, 3).reshape(B, nh * K, h, w)
        # bilinear without align_corners: F.interpolate's default, as in the official code
        a = F.interpolate(a, size=size, mode="bilinear").reshape(B, nh, K, *size)
        # the official code takes min and max with .item(): they carry no gradient
        lo = a.amin(dim=(-2, -1), keepdim=True).detach()
        hi = a.amax(dim=(-2, -1), keepdim=True).detach()
        out.append((a - lo) / (hi - lo).clamp_min(1e-8))  # floor: a constant map would give 0/0
    return torch.cat(out, dim=1)


def attention_refocus(maps, masks, present=None):
    """Eq. 8: L_attn = E_k || (S(A_k) - M_k) * not(M_k) ||^2, per sample, aggregated as the official code does.

    maps: list over recorded cross-attention layers of (B, heads, h, w, K)
    softmax probabilities of the K placeholder tokens, with gradient.
    masks: (B, K, H, W), the region each token may attend to
    ([V1] -> face, [V2] -> non-face). present: (B, K) bool, which tokens each
    sample's prompt holds (None: all). Each scaled map is set to 1 inside its
    mask (official: where mask >= 0.5), the maps are averaged over layers and
    heads, and the squared error against the mask is averaged over pixels, so
    only attention outside the mask costs anything. Returns (B,): the mean
    over the tokens present in each sample's prompt (E_k), as the official code
    averages over the placeholders of its prompt; absent tokens cost nothing.
    """
    s = _scaled_maps(maps, masks.shape[-2:])  # (B, L*heads, K, H, W)
    m = masks.float()
    s = torch.where(m[:, None] >= 0.5, 1.0, s)
    per_token = ((s.mean(dim=1) - m) ** 2).mean(dim=(-2, -1))  # (B, K)
    present = torch.ones_like(per_token) if present is None else present.float()
    return (per_token * present).sum(dim=1) / present.sum(dim=1).clamp_min(1)


@torch.no_grad()
def attention_outside(maps, masks):
    """Mean scaled attention of each token outside its mask, for logging: a (K,) tensor.

    Same scaling and layer/head average as attention_refocus; 0 for a token
    whose mask covers the whole image.
    """
    s = _scaled_maps(maps, masks.shape[-2:]).mean(dim=1)  # (B, K, H, W)
    outside = (masks.float() < 0.5).float()
    return (s * outside).sum(dim=(0, 2, 3)) / outside.sum(dim=(0, 2, 3)).clamp_min(1)


# -----------------------------------------------------------------------------
# General objects (supplement, eq. 11): DINO ViT-B/8 features of x0_hat for the composed prompt, with the
# losses of DiffuseIT (Kwon & Ye, ICLR 2023), L = 0.1 L_ssim + 0.2 L_contra + 2 L_style. keys are the last
# layer's attention keys (B, heads, T, d) and cls its [CLS] output (model.py's ViT); DiffuseIT reads both from
# its last block (layer index 11) and passes all T = 1 + N tokens, [CLS] included, to the two key losses.

def _token_keys(keys):
    """(B, heads, T, d) -> (B, T, heads*d) unit vectors: each token's heads concatenated, as Splicing ViT
    Features (Tumanyan et al., CVPR 2022) and DiffuseIT compare keys."""
    B, nh, T, d = keys.shape
    return F.normalize(keys.float().transpose(1, 2).reshape(B, T, nh * d), dim=-1)


def self_similarity_loss(keys, keys_ref):
    """Eq. 11's L_ssim (DiffuseIT's structure loss, after Splicing ViT Features): the self-similarity matrices
    of the two images' keys should agree,

        S_ij = cos(k_i, k_j),   L = mean_ij (S_ij(x0_hat) - S_ij(I_s))^2,

    over all T tokens given, [CLS] included (DiffuseIT passes all 1 + N). keys: x0_hat's (B, heads, T, d), with
    gradient; keys_ref: the source photo's, a fixed target (detached; DiffuseIT computes it under no_grad).
    Returns (B,): 0 when the two images have the same key geometry, whatever their appearance.
    """
    def sim(k):
        k = _token_keys(k)
        return k @ k.transpose(1, 2)  # (B, T, T)
    return ((sim(keys) - sim(keys_ref.detach())) ** 2).mean(dim=(1, 2))


def patch_contrastive_loss(keys, keys_ref, temperature=0.07):
    """Eq. 11's L_contra: PatchNCE (Park et al., CUT, ECCV 2020, eq. 2-3) on DINO keys, as DiffuseIT uses it.
    Token i of x0_hat (the query) should match token i of the source photo (the positive) rather than the
    source's other tokens (the negatives):

        L = mean_i -log( exp(cos(q_i, k_i) / tau) / sum_j exp(cos(q_i, k_j) / tau) ),   tau = 0.07 (CUT's)

    over all T tokens given, [CLS] included, with no subsampling (DiffuseIT uses all 1 + N tokens, 785 at 224 px).
    DiffuseIT keeps the positive a second time among the negatives with its logit set to -10 / tau, which adds
    exp(-143) to the denominator: left out here. keys: x0_hat's (B, heads, T, d), with gradient; keys_ref: the
    source photo's, a fixed target (detached, as DiffuseIT does). Returns (B,). Its minimum is not 0 and not
    at keys == keys_ref: the loss also pushes each q_i away from the source's other tokens.
    """
    q, k = _token_keys(keys), _token_keys(keys_ref.detach())
    logits = q @ k.transpose(1, 2) / temperature  # (B, T queries, T source tokens)
    target = torch.arange(q.shape[1], device=q.device).expand(q.shape[0], -1)  # the positive is the same token
    return F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(dim=1)


def dino_style_loss(cls, cls_ref):
    """Eq. 11's L_style (DiffuseIT's [CLS] loss): mean squared difference between the [CLS] tokens of x0_hat and
    of the reference photo, || e_cls(x0_hat) - e_cls(I_r) ||^2 / D.

    cls, cls_ref: (B, D) [CLS] tokens of the last block's output, before DINO's final LayerNorm, as DiffuseIT takes
    them (model.py's ViT.last_block); cls_ref is a fixed target (detached; DiffuseIT computes it under no_grad).
    Returns (B,).
    """
    return ((cls.float() - cls_ref.detach().float()) ** 2).mean(dim=-1)
