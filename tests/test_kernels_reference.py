"""The PyTorch references against literal per-point loops written from DESIGN.md."""
import pytest
import torch
import torch.nn.functional as F

from fastdrag.kernels import masked_l1, motion_supervision_loss, point_features, track_points
from fastdrag.kernels.reference import bilinear


def loop_bilinear(feat, r, c):
    _, _, height, width = feat.shape
    r = min(max(r, 0.0), height - 1.0)
    c = min(max(c, 0.0), width - 1.0)
    r0, c0 = int(torch.floor(torch.tensor(r))), int(torch.floor(torch.tensor(c)))
    r1, c1 = min(r0 + 1, height - 1), min(c0 + 1, width - 1)
    wr, wc = r - r0, c - c0
    return (feat[0, :, r0, c0] * (1 - wr) * (1 - wc) + feat[0, :, r0, c1] * (1 - wr) * wc
            + feat[0, :, r1, c0] * wr * (1 - wc) + feat[0, :, r1, c1] * wr * wc)


def loop_loss(feat, handles, targets, r_m, size):
    feat = F.interpolate(feat, size=size, mode="bilinear", align_corners=False) if size else feat
    _, _, height, width = feat.shape
    total = 0.0
    for h, g in zip(handles.tolist(), targets.tolist(), strict=True):
        h, g = torch.tensor(h), torch.tensor(g)
        if (g - h).norm() < 2:
            continue
        d = (g - h) / (g - h).norm()
        terms = []
        for dr in range(-r_m, r_m + 1):
            for dc in range(-r_m, r_m + 1):
                r, c = int(h[0]) + dr, int(h[1]) + dc
                if 0 <= r < height and 0 <= c < width:
                    fixed = feat[0, :, r, c].detach()
                    terms.append((fixed - loop_bilinear(feat, r + float(d[0]), c + float(d[1]))).abs())
        total = total + (2 * r_m + 1) ** 2 * torch.stack(terms).mean()
    return total


def random_points(generator, n, height, width):
    return torch.stack([torch.randint(0, height, (n,), generator=generator),
                        torch.randint(0, width, (n,), generator=generator)], -1).float()


@pytest.mark.parametrize("channels, native, size, n", [(37, (13, 17), (27, 35), 3), (5, (8, 8), None, 8), (16, (9, 11), (20, 21), 1)])
def test_motion_loss_matches_the_loop(channels, native, size, n):
    generator = torch.Generator().manual_seed(channels + n)
    feat = torch.randn(1, channels, *native, generator=generator, dtype=torch.float64, requires_grad=True)
    height, width = size or native
    handles = random_points(generator, n, height, width)
    handles[0] = torch.tensor([0.0, width - 1.0])  # a corner: the patch leaves the map
    targets = random_points(generator, n, height, width)
    targets[0] = torch.tensor([5.0, width - 1.0])   # exactly axis-aligned shift
    loss = motion_supervision_loss(feat, handles, targets, 1, size)
    expected = loop_loss(feat, handles, targets, 1, size)
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, feat)
    (grad_expected,) = torch.autograd.grad(expected, feat)
    torch.testing.assert_close(grad.to(torch.float64), grad_expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_pairs_near_their_target_contribute_nothing():
    feat = torch.randn(1, 4, 10, 10, generator=torch.Generator().manual_seed(0))
    handles = torch.tensor([[3.0, 3.0], [6.0, 6.0]])
    near = torch.tensor([[4.0, 4.0], [6.0, 7.0]])  # distances sqrt(2) and 1
    assert motion_supervision_loss(feat, handles, near) == 0
    far = torch.tensor([[3.0, 8.0], [6.0, 7.0]])
    assert motion_supervision_loss(feat, handles, far) > 0


def test_bilinear_matches_grid_sample_with_border_padding():
    generator = torch.Generator().manual_seed(3)
    feat = torch.randn(1, 6, 9, 13, generator=generator, dtype=torch.float64)
    points = torch.rand(50, 2, generator=generator, dtype=torch.float64) * torch.tensor([10.0, 14.0]) - 0.5
    grid = torch.stack([points[:, 1] / 12 * 2 - 1, points[:, 0] / 8 * 2 - 1], -1).view(1, 1, -1, 2)
    expected = F.grid_sample(feat, grid, mode="bilinear", padding_mode="border", align_corners=True)[0, :, 0].T
    torch.testing.assert_close(bilinear(feat, points), expected)


def loop_track(feat, handle_feats, handles, r_p, size):
    feat = F.interpolate(feat, size=size, mode="bilinear", align_corners=False) if size else feat
    _, _, height, width = feat.shape
    out = []
    for f0, h in zip(handle_feats, handles.tolist(), strict=True):
        r1, r2 = max(0, int(h[0]) - r_p), min(height, int(h[0]) + r_p + 1)
        c1, c2 = max(0, int(h[1]) - r_p), min(width, int(h[1]) + r_p + 1)
        dist = (feat[0, :, r1:r2, c1:c2] - f0[:, None, None]).abs().sum(0)
        row, col = divmod(int(dist.argmin()), dist.shape[-1])
        out.append([r1 + row, c1 + col])
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("channels, native, size, n", [(37, (13, 17), (27, 35), 8), (640, (16, 16), (32, 32), 3)])
def test_track_points_matches_the_loop(channels, native, size, n):
    generator = torch.Generator().manual_seed(n)
    feat0 = torch.randn(1, channels, *native, generator=generator)
    feat = feat0 + 0.5 * torch.randn(1, channels, *native, generator=generator)
    handles = random_points(generator, n, *size)
    handles[0] = torch.tensor([0.0, 0.0])
    handles[1] = torch.tensor([size[0] - 1.0, size[1] - 2.0])
    handle_feats = point_features(feat0, handles, size)
    moved = track_points(feat, handle_feats, handles, 3, size)
    assert torch.equal(moved, loop_track(feat, handle_feats, handles, 3, size))


def test_track_points_ties_go_to_the_first_in_row_major_order():
    feat = torch.zeros(1, 2, 10, 10)
    feat[0, :, 4, 6] = 1.0
    feat[0, :, 6, 2] = 1.0   # same feature, later in row-major order
    handle_feats = torch.ones(1, 2)
    assert track_points(feat, handle_feats, torch.tensor([[5.0, 4.0]]), 3).tolist() == [[4.0, 6.0]]


def test_masked_l1():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 7, 9, generator=generator, requires_grad=True)
    x0 = torch.randn(1, 4, 7, 9, generator=generator)
    mask = (torch.rand(1, 1, 7, 9, generator=generator) > 0.5).float()
    value = masked_l1(x, x0, mask)
    xd = x.detach()
    expected = sum(abs(float(xd[0, c, i, j] - x0[0, c, i, j])) for c in range(4) for i in range(7) for j in range(9)
                   if mask[0, 0, i, j] == 0)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert torch.equal(x.grad[mask.expand_as(x) == 1], torch.zeros(int(mask.sum()) * 4))
    assert masked_l1(x, x0, torch.ones_like(mask)).item() == 0
