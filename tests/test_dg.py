"""Post-hoc DG in the evaluation networks (sgs_cuda.dg): MixStyle and FACT's amplitude mix."""
import pytest
import torch

from sgs_cuda.dg import MixStyle, add_mixstyle, amplitude_mix
from sgs_cuda.dm.networks import build_convnet
from sgs_cuda.evaluate import EvalConfig, train_classifier


def batch(n=6, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_mixstyle_is_a_no_op_at_zero_and_in_eval_mode():
    x = batch()
    assert torch.equal(MixStyle(p=0.0)(x), x)
    m = MixStyle(p=1.0).eval()
    assert torch.equal(m(x), x)


def test_mixstyle_keeps_shapes_and_mixes_statistics_only():
    x = batch() * torch.arange(1, 7).view(6, 1, 1, 1) + torch.arange(6).view(6, 1, 1, 1)
    y = MixStyle(p=1.0, alpha=0.1, generator=torch.Generator().manual_seed(1))(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    # each image's normalised content is unchanged: only mean and std move
    norm = lambda t: (t - t.mean((2, 3), keepdim=True)) / t.std((2, 3), keepdim=True)  # noqa: E731
    assert torch.allclose(norm(y), norm(x), atol=1e-4)


def test_mixstyle_inserted_between_convnet_blocks_and_refused_elsewhere():
    net = build_convnet((3, 32, 32), 10, width=8, depth=3)
    out_before = net(batch(4).repeat(1, 1, 2, 2))
    add_mixstyle(net, 0.5, 0.1, torch.Generator().manual_seed(0))
    assert sum(isinstance(m, MixStyle) for m in net.modules()) == 2
    net.eval()
    assert torch.allclose(net(batch(4).repeat(1, 1, 2, 2)), out_before)  # off outside training
    from sgs_cuda.dm.architectures import build_network
    with pytest.raises(ValueError, match="ConvNet"):
        add_mixstyle(build_network("alexnet", (3, 32, 32), 10, 8), 0.5, 0.1, torch.Generator())
    with pytest.raises(ValueError, match="ConvNet evaluator only"):
        EvalConfig(mixstyle=0.5, arch="convnet,vgg11")


def test_amplitude_mix_no_op_at_zero_and_keeps_phase():
    x = batch(8)
    assert torch.equal(amplitude_mix(x, 0.0, torch.Generator()), x)
    y = amplitude_mix(x, 1.0, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.allclose(y, x)
    fx, fy = torch.fft.rfft2(x), torch.fft.rfft2(y)
    strong = fy.abs() > 1e-3 * fy.abs().amax()
    # the phase is each image's own (where the mixed amplitude is not ~0)
    d = torch.remainder(fy.angle() - fx.angle() + torch.pi, 2 * torch.pi) - torch.pi
    assert d[strong].abs().max() < 1e-3
    with pytest.raises(ValueError, match="eta"):
        amplitude_mix(x, 1.5, torch.Generator())


def test_amplitude_mix_amplitude_is_a_convex_combination():
    x = batch(2)
    y = amplitude_mix(x, 1.0, torch.Generator().manual_seed(3))
    a, b, m = torch.fft.rfft2(x[0]).abs(), torch.fft.rfft2(x[1]).abs(), torch.fft.rfft2(y[0]).abs()
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    assert bool(((m >= lo - 1e-4) & (m <= hi + 1e-4)).all())


def test_evaluation_with_dg_off_is_bit_identical_and_on_differs():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 3, 32, 32, generator=g), torch.arange(20) % 4
    base = EvalConfig(epochs=2, num_eval=1, width=8, batch=8)
    _, loss0 = train_classifier(x, y, 4, base, seed=0)
    _, loss1 = train_classifier(x, y, 4, EvalConfig(**{**base.to_dict(), "mixstyle": 0.0, "amp_mix": 0.0}), seed=0)
    assert loss0 == loss1
    _, loss_ms = train_classifier(x, y, 4, EvalConfig(**{**base.to_dict(), "mixstyle": 1.0}), seed=0)
    _, loss_am = train_classifier(x, y, 4, EvalConfig(**{**base.to_dict(), "amp_mix": 1.0}), seed=0)
    assert loss_ms != loss0 and loss_am != loss0
