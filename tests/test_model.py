"""The network: shapes, scale invariance, masks, class-activation maps, a tiny batch overfitted."""

import pytest
import torch

from qdsize.ml.model import ModelConfig, QDNet, normalise_input
from qdsize.sim.errors import InputError


@pytest.mark.parametrize("cfg", [
    ModelConfig(),
    ModelConfig(channels=[16, 16], kernels=[5, 3], strides=[4, 4], dropout=0.0, norm="none"),
    ModelConfig(channels=[16, 16], kernels=[5, 3], strides=[4, 4], position_channel=False),  # older models
    ModelConfig(channels=[8, 16, 32], kernels=[10, 5, 4], strides=[10, 5, 4], norm="group",
                n_size_classes=17, n_dispersion_classes=3),
    # widths a sweep draws freely (23, 42: not multiples of 8) with group norm
    ModelConfig(channels=[23, 42, 51], kernels=[9, 5, 3], strides=[4, 2, 2], norm="group"),
])
@pytest.mark.parametrize("n_q", [1801, 700])
def test_output_shapes(cfg, n_q):
    m = QDNet(cfg).eval()
    out = m(torch.rand(3, n_q) + 0.1)
    assert out["size_logits"].shape == (3, cfg.n_size_classes)
    assert out["dispersion_logits"].shape == (3, cfg.n_dispersion_classes)
    for k in ("mean_diameter", "mean_diameter_logvar", "dispersion", "dispersion_logvar"):
        assert out[k].shape == (3,)
    assert m.class_activation_map(torch.rand(3, n_q) + 0.1).shape == (3, n_q)


def test_predictions_do_not_depend_on_the_overall_scale():
    torch.manual_seed(0)
    m = QDNet().eval()
    x = torch.rand(4, 1801) * 1e4 + 10
    with torch.no_grad():
        a, b = m(x), m(x * 3.7e-3)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_masked_points_do_not_influence_the_input():
    x = torch.rand(2, 100) + 1
    mask = torch.ones(2, 100)
    mask[:, 80:] = 0
    y = x.clone()
    y[:, 80:] = 1e9
    torch.testing.assert_close(normalise_input(x, mask), normalise_input(y, mask))


def test_a_tiny_batch_is_overfitted():
    torch.manual_seed(1)
    cfg = ModelConfig(channels=[16, 32, 32], kernels=[7, 5, 3], strides=[4, 4, 2], dropout=0.0)
    m = QDNet(cfg)
    x = torch.rand(16, 600) + torch.linspace(0, 3, 600) * torch.arange(16)[:, None] / 16
    ys = torch.arange(16) % 10
    yd = torch.arange(16) % 4
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(300):
        out = m(x)
        loss = torch.nn.functional.cross_entropy(out["size_logits"], ys) + \
            torch.nn.functional.cross_entropy(out["dispersion_logits"], yd)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        out = m(x)
    assert (out["size_logits"].argmax(1) == ys).all()
    assert (out["dispersion_logits"].argmax(1) == yd).all()


def test_bad_architecture_names_the_field():
    with pytest.raises(InputError, match="model.kernels"):
        ModelConfig(channels=[8, 8], kernels=[3], strides=[2, 2])
    with pytest.raises(InputError, match="model.norm"):
        ModelConfig(norm="layer")
    with pytest.raises(InputError, match="model.dropout"):
        ModelConfig(dropout=1.5)


def test_position_channel_runs_from_minus_one_to_one_and_is_optional():
    x = torch.rand(2, 50) + 1
    with_pos, without = normalise_input(x, position=True), normalise_input(x)
    assert with_pos.shape == (2, 3, 50) and without.shape == (2, 2, 50)
    torch.testing.assert_close(with_pos[:, :2], without)
    assert with_pos[0, 2, 0] == -1 and with_pos[1, 2, -1] == 1
    assert QDNet(ModelConfig(resolution_input=False)).features[0].in_channels == 3
    assert QDNet(ModelConfig(position_channel=False, resolution_input=False)).features[0].in_channels == 2


def test_resolution_input_says_known_or_not_and_changes_the_prediction():
    from qdsize.ml.model import RESOLUTION_SCALE

    x = torch.rand(3, 64) + 1
    res = torch.tensor([[0.02, 0.002, 0.0], [float("nan")] * 3, [0.05, 0.006, 0.2]])
    ch = normalise_input(x, position=True, resolution=res, resolution_input=True)
    assert ch.shape == (3, 7, 64)
    assert ch[0, 3].eq(1).all() and ch[1, 3:].eq(0).all() and ch[2, 3].eq(1).all()  # known flags; unknown all zero
    torch.testing.assert_close(ch[2, 4:, 0], torch.tensor([0.05, 0.006, 0.2]) / torch.tensor(RESOLUTION_SCALE))
    torch.testing.assert_close(ch[0, 4, :], torch.full((64,), 0.4))  # constant along Q
    none = normalise_input(x, position=True, resolution=None, resolution_input=True)
    unknown = normalise_input(x, position=True, resolution=res[[1, 1, 1]], resolution_input=True)
    torch.testing.assert_close(none, unknown)
    torch.manual_seed(0)
    net = QDNet(ModelConfig(channels=[8, 8], kernels=[5, 3], strides=[2, 2])).eval()
    assert net.features[0].in_channels == 7
    told, blind = net(x, resolution=res[[0, 0, 0]]), net(x)
    assert not torch.allclose(told["mean_diameter"], blind["mean_diameter"])
    torch.testing.assert_close(net(x, resolution=res[0])["mean_diameter"], told["mean_diameter"])  # one row for all


def test_class_probabilities_of_the_continuous_estimate():
    from qdsize.ml.model import interval_probs

    edges = [2.0, 3.0, 4.0, 5.0]
    mean = torch.tensor([2.5, 3.99, 4.6, 3.5, 40.0, -5.0])
    std = torch.tensor([0.01, 0.01, 0.3, 100.0, 0.01, 0.01])
    p = interval_probs(mean, std, edges)
    torch.testing.assert_close(p.sum(1), torch.ones(6))
    assert p.argmax(1).tolist() == [0, 1, 2, 1, 2, 0]  # the class of the mean; far outside: the nearest end
    assert p[0, 0] > 0.999 and abs(p[1, 1] - p[1, 2]) < 0.9 and p[3].max() - p[3].min() < 0.01  # wide: flat
    net = QDNet(ModelConfig(channels=[8], kernels=[3], strides=[2], n_size_classes=3, n_dispersion_classes=2,
                            size_edges_nm=edges, dispersion_edges_pct=[0.0, 10.0, 25.0])).eval()
    out = net(torch.rand(4, 32) + 1)
    assert out["size_probs"].shape == (4, 3) and out["dispersion_probs"].shape == (4, 2)
    with pytest.raises(InputError, match="model.size_edges_nm"):
        ModelConfig(n_size_classes=3, size_edges_nm=[2.0, 3.0])
