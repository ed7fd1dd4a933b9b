"""Cross-architecture evaluation: AlexNet, VGG-11 and ResNet-18 next to the ConvNet."""
import pytest
import torch
from tiny_domains import TinyDomains

from sgs_cuda.dm.architectures import ARCHITECTURES, build_network, parse_archs
from sgs_cuda.evaluate import EvalConfig, evaluate_synthetic, random_real_subset, same_eval_config, train_classifier


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_shapes(arch, shape):
    for norm in ("instancenorm", "batchnorm", "none"):
        net = build_network(arch, shape, 7, width=4, norm=norm, generator=torch.Generator().manual_seed(0))
        x = torch.randn(3, *shape)
        feats = net.embed(x)
        assert feats.shape == (3, net.num_features)
        assert net(x).shape == (3, 7)
    norms = {type(m) for m in build_network(arch, shape, 7, width=4, norm="instancenorm").modules()}
    assert torch.nn.GroupNorm in norms and torch.nn.BatchNorm2d not in norms
    norms = {type(m) for m in build_network(arch, shape, 7, width=4, norm="batchnorm").modules()}
    assert torch.nn.BatchNorm2d in norms and torch.nn.GroupNorm not in norms


def test_widths_and_feature_sizes():
    # first-stage width w: AlexNet ends with 1.5 w channels on a 4x4 map, VGG-11 with 8 w on 1x1,
    # ResNet-18 with 8 w after global pooling
    assert build_network("alexnet", (3, 32, 32), 10, width=8).num_features == 12 * 4 * 4
    assert build_network("vgg11", (3, 32, 32), 10, width=8).num_features == 64
    assert build_network("vgg11", (3, 64, 64), 10, width=8).num_features == 64 * 2 * 2
    assert build_network("resnet18", (3, 64, 64), 10, width=8).num_features == 64
    convs = [m for m in build_network("resnet18", (3, 32, 32), 10, width=8).modules()
             if isinstance(m, torch.nn.Conv2d)]
    assert len([c for c in convs if c.kernel_size == (3, 3)]) == 17  # stem + 8 blocks x 2
    vgg_convs = [m for m in build_network("vgg11", (3, 32, 32), 10, width=8).modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in vgg_convs] == [8, 16, 32, 32, 64, 64, 64, 64]
    # the reference widths when none is given
    assert build_network("vgg11", (3, 32, 32), 10).num_features == 512
    with pytest.raises(ValueError, match="too small"):
        build_network("vgg11", (3, 16, 16), 10)
    with pytest.raises(ValueError, match="arch must be one of"):
        build_network("lenet", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="norm"):
        build_network("resnet18", (3, 32, 32), 10, norm="layernorm")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_determinism_from_a_generator(arch):
    a = build_network(arch, (3, 32, 32), 5, width=4, generator=torch.Generator().manual_seed(3))
    b = build_network(arch, (3, 32, 32), 5, width=4, generator=torch.Generator().manual_seed(3))
    c = build_network(arch, (3, 32, 32), 5, width=4, generator=torch.Generator().manual_seed(4))
    state = torch.get_rng_state()
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.dim() > 1:  # conv/linear weights (norm weights are 1 and 0)
            assert not torch.equal(pa, pc), name
    assert torch.equal(state, torch.get_rng_state())  # the global generator was not used
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a(x), b(x))


def test_parse_archs_and_eval_config():
    assert parse_archs("convnet") == [("convnet", None)]
    assert parse_archs("convnet, vgg11:16,resnet18:8") == [("convnet", None), ("vgg11", 16), ("resnet18", 8)]
    for bad, msg in (("lenet", "unknown architecture"), ("vgg11:x", "integer"), ("vgg11:0", ">= 1"),
                     ("convnet,convnet", "twice")):
        with pytest.raises(ValueError, match=msg):
            EvalConfig(arch=bad)
    cfg = EvalConfig(arch="convnet,alexnet:8", width=16)
    per = cfg.per_arch()
    assert list(per) == ["convnet", "alexnet"] and per["convnet"].width == 16 and per["alexnet"].width == 8
    assert per["alexnet"].arch == "alexnet" and per["alexnet"].epochs == cfg.epochs
    assert EvalConfig().arch == "convnet"
    old = {k: v for k, v in EvalConfig().to_dict().items() if k != "arch"}  # a metrics.json from before
    assert same_eval_config(old, EvalConfig()) and not same_eval_config(old, EvalConfig(arch="vgg11"))
    assert not same_eval_config({"epochz": 3}, EvalConfig()) and not same_eval_config(None, EvalConfig())
    with pytest.raises(ValueError, match="one architecture"):
        train_classifier(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), 2, cfg)


@pytest.mark.parametrize("arch", ["alexnet", "vgg11", "resnet18"])
def test_a_short_training_learns_a_separable_set(arch):
    data = TinyDomains(size=32, noise=0.3, style_scale=0.3)
    x, y = random_real_subset(data, ["d1", "d2"], ipc=4, seed=0)
    cfg = EvalConfig(epochs=25, num_eval=1, width=4, batch=12, lr=0.01, dsa=False, arch=arch)
    r = evaluate_synthetic(x, y, data, ["d1", "d2"], "d0", cfg, seed=0)
    assert r["in_domain_acc_mean"] > 0.9 and r["ood_acc_mean"] > 0.8
    bad = evaluate_synthetic(x, (y + 1) % 3, data, ["d1", "d2"], "d0", cfg, seed=0)
    assert bad["in_domain_acc_mean"] < 0.2  # it learned the shifted labels, not the test set


def test_several_architectures_per_set():
    data = TinyDomains(size=8)
    x, y = random_real_subset(data, ["d1", "d2"], ipc=2, seed=0)
    base = dict(epochs=5, num_eval=2, width=8, depth=2, batch=8)
    alone = evaluate_synthetic(x, y, data, ["d1", "d2"], "d0", EvalConfig(**base), seed=1)
    both = evaluate_synthetic(x, y, data, ["d1", "d2"], "d0", EvalConfig(**base, arch="convnet,resnet18:4"), seed=1)
    assert list(both["per_arch"]) == ["convnet", "resnet18"] and list(alone["per_arch"]) == ["convnet"]
    # the first architecture's numbers are the top-level ones, identical to evaluating it alone
    for key in ("ood_acc", "in_domain_acc", "train_loss", "ood_acc_mean", "per_domain"):
        assert both[key] == alone[key] == both["per_arch"]["convnet"][key]
    res = both["per_arch"]["resnet18"]
    assert res["width"] == 4 and len(res["ood_acc"]) == 2 and res["train_loss"] != alone["train_loss"]
    assert both["config"]["arch"] == "convnet,resnet18:4"


def test_eval_depth_auto_follows_the_resolution():
    from sgs_cuda.dm.architectures import build_network
    from sgs_cuda.evaluate import EvalConfig

    assert EvalConfig(depth="auto").depth == "auto"
    with pytest.raises(ValueError, match="depth must be >= 1 or 'auto'"):
        EvalConfig(depth="deep")
    for size, depth in ((32, 3), (64, 4), (128, 5)):
        net = build_network("convnet", (3, size, size), 10, 8, EvalConfig(depth="auto").depth)
        assert sum(isinstance(m, torch.nn.AvgPool2d) for m in net.modules()) == depth
