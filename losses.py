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
