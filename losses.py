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
    """Eq. 7: L_id = 1 - cos(R(B(x0_hat)), R(B(I_s))), averaged over the batch (x0_hat: model.py's
    Schedule.predict_x0).

    emb, emb_ref: (B, D) face embeddings (ArcFace), not necessarily normalised.
    Same value as the official torch CosineEmbeddingLoss with target 1.
    """
    return (1 - F.cosine_similarity(emb, emb_ref, dim=-1)).mean()


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


def attention_refocus(maps, masks):
    """Eq. 8: L_attn = E_k || (S(A_k) - M_k) * not(M_k) ||^2, aggregated as the official code does.

    maps: list over recorded cross-attention layers of (B, heads, h, w, K)
    softmax probabilities of the K placeholder tokens, with gradient.
    masks: (B, K, H, W), the region each token may attend to
    ([V1] -> face, [V2] -> non-face). Each scaled map is set to 1 inside its
    mask (official: where mask >= 0.5), the maps are averaged over layers and
    heads, and the squared error against the mask is averaged over batch,
    tokens and pixels; so only attention outside the mask costs anything.
    (The official code sums over the batch instead; its batch is 1.)
    """
    s = _scaled_maps(maps, masks.shape[-2:])  # (B, L*heads, K, H, W)
    m = masks.float()
    s = torch.where(m[:, None] >= 0.5, 1.0, s)
    return ((s.mean(dim=1) - m) ** 2).mean()


@torch.no_grad()
def attention_outside(maps, masks):
    """Mean scaled attention of each token outside its mask, for logging: a (K,) tensor.

    Same scaling and layer/head average as attention_refocus; 0 for a token
    whose mask covers the whole image.
    """
    s = _scaled_maps(maps, masks.shape[-2:]).mean(dim=1)  # (B, K, H, W)
    outside = (masks.float() < 0.5).float()
    return (s * outside).sum(dim=(0, 2, 3)) / outside.sum(dim=(0, 2, 3)).clamp_min(1)
