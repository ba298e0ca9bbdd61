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
    for k in ("mean_diameter_nm", "mean_diameter_nm_logvar", "size_dispersion_pct", "size_dispersion_pct_logvar"):
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
    assert not torch.allclose(told["mean_diameter_nm"], blind["mean_diameter_nm"])
    one_row = net(x, resolution=res[0])  # one row for all
    torch.testing.assert_close(one_row["mean_diameter_nm"], told["mean_diameter_nm"])


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


def _fused_on_a_grid(mean, std, probs, edges, power):
    """Oracle for `fuse`: the product density summed on a fine grid in float64 (outer classes reach out with the
    density of their nominal width)."""
    import numpy as np

    e = np.asarray(edges, dtype=np.float64)
    d = np.linspace(mean - 12 * std, mean + 12 * std, 400_001)
    k = np.clip(np.searchsorted(e, d, side="right") - 1, 0, len(e) - 2)
    density = np.exp(-0.5 * ((d - mean) / std) ** 2) * (np.asarray(probs)[k] / np.diff(e)[k]) ** power
    density /= density.sum()
    m = (density * d).sum()
    return m, np.sqrt((density * (d - m) ** 2).sum()), np.bincount(k, density, minlength=len(e) - 1), d, density


def test_fusion_of_the_two_experts_against_a_grid_integration():
    """Mean, standard deviation and class masses of N(mean, std) x (class-head density)^power agree with a brute-force
    integration; power 0 is the Gaussian itself, its tails in the outer classes; the NLL is the density's."""
    import math

    import numpy as np

    from qdsize.ml.model import fuse, fused_nll

    edges = [2.0, 3.0, 4.0, 6.0, 7.0]
    probs = torch.tensor([[0.05, 0.6, 0.3, 0.05], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    mean = torch.tensor([3.2, 6.8, 2.5], dtype=torch.float64)
    std = torch.tensor([0.7, 0.4, 1.5], dtype=torch.float64)
    for power in (0.0, 0.45, 1.0, 2.0):
        m, s, mass = fuse(mean, std, probs, edges, power)
        for i in range(3):
            om, os_, omass, d, density = _fused_on_a_grid(float(mean[i]), float(std[i]), probs[i].numpy(), edges, power)
            assert float(m[i]) == pytest.approx(om, abs=1e-4) and float(s[i]) == pytest.approx(os_, rel=1e-3)
            np.testing.assert_allclose(mass[i].numpy(), omass, atol=1e-4)
            target = float(mean[i]) + 0.3
            nll = fused_nll(mean[i:i + 1], std[i:i + 1], probs[i:i + 1], edges, power,
                            torch.tensor([target], dtype=torch.float64))
            grid_pdf = np.interp(target, d, density) / (d[1] - d[0])
            assert float(nll) + 0.5 * math.log(2 * math.pi) == pytest.approx(-math.log(grid_pdf), abs=2e-3)
        if power == 0:
            torch.testing.assert_close(m, mean)
            torch.testing.assert_close(s, std)
    m, s, _ = fuse(mean, std, probs, edges, 1.0)
    assert float(m[0]) > 3.2 and float(s[0]) < 0.7  # the head's mass on 4-6 nm pulls the mean up and narrows it
    m, s, _ = fuse(mean[2:], std[2:], probs[2:], edges, 1.0)  # a flat head (per width: 4-6 nm is half as dense)
    assert float(m[0]) < 2.5


def test_fusion_is_off_in_a_new_network_and_changes_the_answer_when_on():
    net = QDNet(ModelConfig(channels=[8], kernels=[3], strides=[2], n_size_classes=3, n_dispersion_classes=2,
                            size_edges_nm=[2.0, 3.0, 4.0, 5.0], dispersion_edges_pct=[0.0, 10.0, 25.0])).eval()
    assert float(net.mean_diameter_nm_fusion_power) == 0 and float(net.size_fusion_temperature) == 1
    x = torch.rand(4, 32) + 1
    plain = net(x)
    net.mean_diameter_nm_fusion_power.fill_(1.0)
    net.size_fusion_temperature.fill_(2.0)
    fused = net(x)
    assert not torch.allclose(plain["mean_diameter_nm"], fused["mean_diameter_nm"])
    torch.testing.assert_close(fused["size_probs"].sum(1), torch.ones(4))
    torch.testing.assert_close(plain["dispersion_probs"], fused["dispersion_probs"])  # its power is still 0


def test_a_model_saved_before_fusion_loads_with_it_off(tmp_path):
    """Weights without the fusion buffers (models saved before them) load with power 0 and temperature 1: the same
    answers as when they were saved."""
    import numpy as np

    from qdsize.ml.predict import WEIGHTS, Predictor

    net = QDNet(ModelConfig(channels=[8], kernels=[3], strides=[2], n_size_classes=3, n_dispersion_classes=2,
                            size_edges_nm=[2.0, 3.0, 4.0, 5.0], dispersion_edges_pct=[0.0, 10.0, 25.0])).eval()
    folder = Predictor(net, np.linspace(1, 8, 32), [2.0, 3.0, 4.0, 5.0], [0.0, 10.0, 25.0]).save(tmp_path / "m")
    state = torch.load(folder / WEIGHTS, weights_only=True)
    torch.save({k: v for k, v in state.items() if "fusion" not in k}, folder / WEIGHTS)
    loaded = Predictor.load(folder).model
    assert float(loaded.mean_diameter_nm_fusion_power) == 0 and float(loaded.size_fusion_temperature) == 1
    x = torch.rand(3, 32) + 1
    torch.testing.assert_close(loaded(x)["mean_diameter_nm"], net(x)["mean_diameter_nm"])


def test_a_model_saved_under_the_old_buffer_names_loads_the_same(tmp_path):
    """Weights saved before the estimates took the label names (mean_diameter_var_scale, dispersion_fusion_power, ...:
    the released model's) load under today's names with their values: the same answers."""
    import numpy as np

    from qdsize.ml.model import RENAMED_BUFFERS
    from qdsize.ml.predict import WEIGHTS, Predictor

    net = QDNet(ModelConfig(channels=[8], kernels=[3], strides=[2], n_size_classes=3, n_dispersion_classes=2,
                            size_edges_nm=[2.0, 3.0, 4.0, 5.0], dispersion_edges_pct=[0.0, 10.0, 25.0])).eval()
    for i, new in enumerate(RENAMED_BUFFERS.values()):
        getattr(net, new).fill_(0.3 + 0.1 * i)  # none at its default, so a buffer left unloaded shows
    folder = Predictor(net, np.linspace(1, 8, 32), [2.0, 3.0, 4.0, 5.0], [0.0, 10.0, 25.0]).save(tmp_path / "m")
    old = {new: name for name, new in RENAMED_BUFFERS.items()}
    state = torch.load(folder / WEIGHTS, weights_only=True)
    torch.save({old.get(k, k): v for k, v in state.items()}, folder / WEIGHTS)
    assert set(RENAMED_BUFFERS) <= set(torch.load(folder / WEIGHTS, weights_only=True))
    loaded = Predictor.load(folder).model
    for k, v in net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    x = torch.rand(3, 32) + 1
    for k, v in net(x).items():
        torch.testing.assert_close(loaded(x)[k], v)
