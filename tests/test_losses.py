"""
Each loss in losses.py against its equation on small hand-computed tensors.
Run: python -m pytest -q tests/test_losses.py
"""

import math

import pytest
import torch

import losses


def test_masked_mse_is_mean_over_mask():
    """Eq. 4-6: squared error summed inside the mask, divided by masked pixels x channels."""
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]]])  # (1, 2, 2, 2)
    target = torch.zeros(1, 2, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])  # left column only
    # inside: channel 0 has 1 and 3, channel 1 has 0 and 0 -> (1 + 9 + 0 + 0) / (2 pixels * 2 channels)
    expected = 10.0 / 4
    got = losses.masked_mse(pred, target, mask).item()
    assert math.isclose(got, expected, rel_tol=1e-6), f"got {got}, expected {expected}"


def test_masked_mse_averages_samples_and_handles_empty_mask():
    """Samples are averaged over their own masks; an all-zero mask gives 0 loss and 0 gradient, not NaN."""
    pred = torch.full((2, 1, 2, 2), 2.0, requires_grad=True)
    target = torch.zeros(2, 1, 2, 2)
    mask = torch.zeros(2, 1, 2, 2)
    mask[0, 0, 0, 0] = 1.0  # sample 0: one pixel, error 4; sample 1: empty
    loss = losses.masked_mse(pred, target, mask)
    loss.backward()
    assert math.isclose(loss.item(), (4.0 + 0.0) / 2, rel_tol=1e-6), f"loss {loss.item()}"
    assert torch.isfinite(pred.grad).all(), f"grad {pred.grad}"
    assert pred.grad[1].abs().max() == 0, f"empty-mask sample got gradient {pred.grad[1]}"


def test_masked_mse_soft_mask_follows_equation():
    """A soft mask weighs the error by M^2 and normalises by sum(M), as eq. 4 with the official rescaling."""
    pred = torch.tensor([[[[2.0, 4.0]]]])  # (1, 1, 1, 2)
    target = torch.zeros(1, 1, 1, 2)
    mask = torch.tensor([[[[0.5, 1.0]]]])
    expected = ((0.5 * 2) ** 2 + (1.0 * 4) ** 2) / 1.5  # (1 + 16) / 1.5
    got = losses.masked_mse(pred, target, mask).item()
    assert math.isclose(got, expected, rel_tol=1e-6), f"got {got}, expected {expected}"


def test_identity_loss_is_one_minus_cosine():
    """Eq. 7: 1 - cos between embeddings, per sample: 0 for parallel, 1 for orthogonal."""
    emb = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    ref = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    got = losses.identity_loss(emb, ref).tolist()
    assert got == pytest.approx([0.0, 1.0], abs=1e-6), f"got {got}"


def test_total_loss_hand_values():
    """Eq. 10: per task w*L + 2.5*A + lambda_id*I, averaged over the tasks."""
    recon = torch.tensor([0.2, 0.4, 0.6])    # s, r, c
    attn = torch.tensor([0.1, 0.02, 0.04])
    ident = torch.tensor([0.5, 0.0, 0.3])    # no identity term on the reference sample
    weight = torch.tensor([1.0, 2.0, 2.0])   # style boost on r and c
    expected = ((0.2 + 2.5 * 0.1 + 0.25 * 0.5) + (2 * 0.4 + 2.5 * 0.02) + (2 * 0.6 + 2.5 * 0.04 + 0.25 * 0.3)) / 3
    got = losses.total_loss(recon, attn, ident, weight, lambda_attn=2.5, lambda_id=0.25).item()
    assert math.isclose(got, expected, rel_tol=1e-6), f"got {got}, expected {expected}"


def _one_map(values):
    """A single layer, single head, single token map (1, 1, h, w, 1) from a (h, w) list."""
    return torch.tensor(values).reshape(1, 1, len(values), len(values[0]), 1)


def test_attention_refocus_hand_value():
    """Eq. 8: min-max scale, set 1 inside the mask, squared error against the mask, mean."""
    maps = [_one_map([[0.1, 0.3], [0.5, 0.9]])]
    masks = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    # scaled: [[0, .25], [.5, 1]] -> inside set to 1: [[1, .25], [.5, 1]]
    # error vs mask: [[0, .0625], [.25, 1]] -> mean 1.3125 / 4
    expected = 1.3125 / 4
    got = losses.attention_refocus(maps, masks).item()
    assert math.isclose(got, expected, rel_tol=1e-6), f"got {got}, expected {expected}"


def test_attention_refocus_upsamples_bilinearly():
    """A 2x2 map is upsampled to the 4x4 mask as the official bilinear (align_corners=False) does."""
    maps = [_one_map([[0.0, 1.0], [0.0, 1.0]])]
    masks = torch.zeros(1, 1, 4, 4)
    masks[..., 2:] = 1.0  # the token may attend to the right half
    # upsampled columns: 0, .25, .75, 1; outside (cols 0-1) errors 0 and .0625 in 4 rows
    expected = 4 * 0.0625 / 16
    got = losses.attention_refocus(maps, masks).item()
    assert math.isclose(got, expected, rel_tol=1e-6), f"got {got}, expected {expected}"


def test_attention_refocus_averages_layers_and_heads():
    """Maps of every layer and head are averaged before the squared error (official aggregation)."""
    head_a = [[0.0, 1.0], [0.0, 0.0]]  # scaled: same; outside value 1 at (0, 1)
    head_b = [[0.0, 0.0], [0.0, 1.0]]  # outside value 0 at (0, 1)
    layer1 = torch.stack([_one_map(head_a)[0, 0], _one_map(head_b)[0, 0]])[None]  # (1, 2, 2, 2, 1)
    layer2 = _one_map(head_b)  # a second layer with one head
    masks = torch.tensor([[0.0, 0.0], [0.0, 1.0]]).reshape(1, 1, 2, 2)
    # mean over 3 maps: outside pixels (0,0)=0, (0,1)=1/3, (1,0)=0; inside 1 vs mask 1
    expected = (1 / 3) ** 2 / 4
    got = losses.attention_refocus([layer1, layer2], masks).item()
    assert math.isclose(got, expected, rel_tol=1e-6), f"got {got}, expected {expected}"


def _two_token_setup():
    """Random maps for 2 tokens at 4x4 with complementary masks, as [V1] face / [V2] non-face."""
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(1, 3, 4, 4, 2, generator=g, requires_grad=True) for _ in range(2)]
    face = torch.zeros(1, 1, 4, 4)
    face[..., 1:3, 1:3] = 1.0
    return maps, torch.cat([face, 1 - face], dim=1)  # (1, 2, 4, 4)


def test_attention_refocus_zero_when_attention_inside():
    """L_attn is 0 when every token attends only inside its own mask."""
    maps, masks = _two_token_setup()
    inside = [(a * masks.permute(0, 2, 3, 1)[:, None]).detach() for a in maps]
    got = losses.attention_refocus(inside, masks).item()
    assert got == 0.0, f"loss {got} with all attention inside the masks"
    outside = losses.attention_outside(inside, masks)
    assert outside.abs().max() == 0, f"attention_outside {outside.tolist()}"


def test_attention_refocus_averages_present_tokens_only():
    """Each sample's value is the mean over the tokens its prompt holds: an absent token neither costs nor
    dilutes (a source prompt has only <v1>, a composed one both)."""
    two_tokens = torch.cat([_one_map([[0.1, 0.3], [0.5, 0.9]]), _one_map([[0.9, 0.1], [0.1, 0.1]])], dim=-1)
    maps = [torch.cat([two_tokens, two_tokens])]  # one layer: two samples, one head, 2x2, two tokens
    masks = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).reshape(1, 1, 2, 2).expand(2, 2, 2, 2)
    # token 0 as in test_attention_refocus_hand_value: 1.3125 / 4; token 1 scaled [[1, 0], [0, 0]] -> 0
    present = torch.tensor([[True, False], [True, True]])
    got = losses.attention_refocus(maps, masks, present).tolist()
    assert got == pytest.approx([1.3125 / 4, 1.3125 / 8], rel=1e-6), f"got {got}"


def test_attention_refocus_gradient_only_outside():
    """The gradient w.r.t. the maps is zero inside each token's mask and nonzero outside."""
    maps, masks = _two_token_setup()
    losses.attention_refocus(maps, masks).sum().backward()
    region = masks.permute(0, 2, 3, 1)[:, None].expand_as(maps[0]).bool()  # (1, heads, 4, 4, 2)
    for i, a in enumerate(maps):
        g_in, g_out = a.grad[region], a.grad[~region]
        assert g_in.abs().max() == 0, f"layer {i}: max |grad| inside {g_in.abs().max().item()}"
        n_zero = (g_out == 0).sum().item()
        assert n_zero == 0, f"layer {i}: {n_zero} of {g_out.numel()} gradients outside are zero"


def test_attention_outside_hand_value():
    """attention_outside is the mean scaled, layer/head-averaged attention outside each token's mask."""
    maps = [_one_map([[0.1, 0.3], [0.5, 0.9]])]
    masks = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    expected = (0.25 + 0.5 + 1.0) / 3
    got = losses.attention_outside(maps, masks)
    assert got.shape == (1,) and math.isclose(got.item(), expected, rel_tol=1e-6), f"got {got}"


# eq. 11 (general objects): DINO key and [CLS] losses

def _keys(tokens_per_head):
    """(1, heads, T, d) keys from a list over heads of (T, d) lists."""
    return torch.tensor(tokens_per_head)[None]


def test_self_similarity_hand_value_concatenates_heads():
    """L_ssim on 3 tokens: token vectors are the heads concatenated ((1,0), (0,1), (1,1)); the reference's tokens
    all point one way (S_ref = 1), so L = (2 * 1 + 4 * (1 - 1/sqrt 2)^2) / 9."""
    keys = _keys([[[1.0], [0.0], [1.0]], [[0.0], [1.0], [1.0]]])  # (1, 2 heads, 3 tokens, 1)
    ref = _keys([[[1.0], [2.0], [0.5]], [[0.0], [0.0], [0.0]]])
    expected = (2 + 4 * (1 - 1 / math.sqrt(2)) ** 2) / 9
    got = losses.self_similarity_loss(keys, ref)
    assert got.shape == (1,) and math.isclose(got.item(), expected, rel_tol=1e-6), f"got {got}, expected {expected}"


def test_self_similarity_zero_for_same_geometry_and_grows_with_noise():
    """L_ssim is 0 for identical keys and for keys rescaled per token (cosines unchanged), per sample; noise on
    the keys raises it, more noise more; the gradient reaches keys only, finite and nonzero."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 3, 10, 4, generator=g)
    scaled = ref * torch.rand(2, 1, 10, 1, generator=g).add(0.5)  # one positive scale per token, shared by heads
    zero = losses.self_similarity_loss(torch.stack([ref[0], scaled[1]]), ref)
    assert zero.abs().max() < 1e-6, f"identical / rescaled keys: {zero}"
    noise = torch.randn(2, 3, 10, 4, generator=g)
    small, large = (losses.self_similarity_loss(ref + s * noise, ref) for s in (0.1, 1.0))
    assert (small > 1e-4).all() and (large > small).all(), f"noise 0.1: {small}, noise 1: {large}"
    keys = (ref + 0.3 * noise).requires_grad_()
    ref = ref.clone().requires_grad_()
    losses.self_similarity_loss(keys, ref).sum().backward()
    assert torch.isfinite(keys.grad).all() and keys.grad.abs().sum() > 0, keys.grad
    assert ref.grad is None, "the source photo's keys are a fixed target"


def test_patch_contrastive_hand_value():
    """PatchNCE with tau = 1 on two orthogonal source tokens: a query equal to the other token pays
    log(1 + e), one equal to its own token log(1 + 1/e); the loss is their mean."""
    ref = _keys([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 1 head, 2 tokens, 2)
    keys = _keys([[[0.0, 2.0], [0.0, 3.0]]])  # both queries point along token 1 (lengths do not matter)
    expected = (math.log(1 + math.e) + math.log(1 + 1 / math.e)) / 2
    got = losses.patch_contrastive_loss(keys, ref, temperature=1.0)
    assert got.shape == (1,) and math.isclose(got.item(), expected, rel_tol=1e-6), f"got {got}, expected {expected}"


def test_patch_contrastive_minimum_and_ordering():
    """With orthogonal source tokens, identical keys reach the bound log(1 + (T - 1) e^(-1/tau)) (about 3e-6 at
    CUT's tau = 0.07); with random ones, identical keys cost less than noisy keys, which cost less than tokens
    shuffled; the gradient reaches keys only, finite and nonzero."""
    T = 6
    ref = torch.eye(T).reshape(1, 1, T, T)  # (1, 1 head, T tokens, d = T)
    for tau in (0.25, 0.07):
        bound = math.log(1 + (T - 1) * math.exp(-1 / tau))
        got = losses.patch_contrastive_loss(ref.clone(), ref, temperature=tau).item()
        # fp32 logits of size 1 / tau leave an absolute error of about 1e-7
        assert math.isclose(got, bound, rel_tol=1e-5, abs_tol=2e-7), f"tau {tau}: got {got}, expected {bound}"
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 3, 20, 8, generator=g)
    same = losses.patch_contrastive_loss(ref.clone(), ref)
    noisy = losses.patch_contrastive_loss(ref + 0.5 * torch.randn(ref.shape, generator=g), ref)
    shuffled = losses.patch_contrastive_loss(ref[:, :, torch.randperm(20, generator=g)], ref)
    assert (same < noisy).all() and (noisy < shuffled).all(), f"same {same}, noisy {noisy}, shuffled {shuffled}"
    keys = (ref + 0.3 * torch.randn(ref.shape, generator=g)).requires_grad_()
    ref = ref.clone().requires_grad_()
    losses.patch_contrastive_loss(keys, ref).sum().backward()
    assert torch.isfinite(keys.grad).all() and keys.grad.abs().sum() > 0, keys.grad
    assert ref.grad is None, "the source photo's keys are a fixed target"


def test_dino_style_loss_is_mse_of_cls():
    """L_style is the mean squared difference of the [CLS] tokens, per sample: 0 when equal, (0 + 4 + 9) / 3 for a
    hand pair, larger for a larger offset; its gradient 2 (cls - cls_ref) / D reaches cls only."""
    cls = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]], requires_grad=True)
    ref = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5]], requires_grad=True)
    got = losses.dino_style_loss(cls, ref)
    assert got.tolist() == pytest.approx([13 / 3, 0.0], abs=1e-6), f"got {got}"
    got.sum().backward()
    expected = 2 * (cls - ref).detach() / 3
    assert torch.allclose(cls.grad, expected), f"grad {cls.grad}, expected {expected}"
    assert ref.grad is None, "the reference photo's [CLS] is a fixed target"
    far = losses.dino_style_loss(torch.tensor([[1.0, 4.0, 6.0]]), ref[:1])
    assert far.item() > 13 / 3, f"a larger offset gave {far.item()}"
