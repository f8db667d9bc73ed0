"""Reference checkpoints load into GWNet and predict exactly what the reference model does.

``reference_forward`` is an independent, functional re-implementation of the reference
forward pass in its own layout, ``(batch, features, nodes, time)``, straight from the raw
state_dict tensors, so the loader's renaming and reshaping and the model's layout are
checked against the original formulation.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gwnet.config import GWNetConfig
from gwnet.errors import GWNetError
from gwnet.nn import GWNet, load_reference_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared"
CHECKPOINT = SHARED / "reference" / "metr-la-improved-gwnet.pth"
METR_LA = SHARED / "data" / "sensor_graph" / "adj_mx.pkl"



@pytest.fixture(scope="module")
def metr_la() -> np.ndarray:
    if not (CHECKPOINT.is_file() and METR_LA.is_file()):
        pytest.skip("../shared (reference checkpoint, METR-LA graph) is not available")
    with open(METR_LA, "rb") as fh:
        return pickle.load(fh, encoding="latin1")[2]


def double_transition(adj: np.ndarray) -> list[torch.Tensor]:
    """The reference's ``asym_adj`` of A and of A^T: each row divided by its sum."""
    def asym(a: np.ndarray) -> torch.Tensor:
        rowsum = a.sum(1, keepdims=True)
        return torch.from_numpy(np.where(rowsum > 0, a / np.where(rowsum > 0, rowsum, 1), 0))

    return [asym(adj).float(), asym(adj.T).float()]


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, supports: list[torch.Tensor],
                      layers: int = 2, order: int = 2) -> torch.Tensor:
    """The reference forward pass in eval mode: x (B, F, N, T) -> (B, horizons, N, T')."""
    def conv(name: str, h: torch.Tensor, dilation: int = 1) -> torch.Tensor:
        return F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], dilation=(1, dilation))

    depth = sum(1 for k in sd if k.startswith("filter_convs.") and k.endswith(".weight"))
    kernel = sd["filter_convs.0.weight"].shape[-1]
    field = 1 + (depth // layers) * sum((kernel - 1) * 2 ** i for i in range(layers))
    if x.size(3) < field:
        x = F.pad(x, (field - x.size(3), 0))
    improved = "cat_feature_conv.weight" in sd
    if improved:
        h = conv("start_conv", x[:, :1]) + F.leaky_relu(conv("cat_feature_conv", x[:, 1:]))
    else:
        h = conv("start_conv", x)
    adjacency = list(supports)
    if "nodevec1" in sd:
        adjacency.append(F.softmax(F.relu(sd["nodevec1"] @ sd["nodevec2"]), dim=1))
    graph_conv = "graph_convs.{}.final_conv" if "graph_convs.0.final_conv.weight" in sd else "gconv.{}.mlp.mlp"

    skip = None
    for i in range(depth):
        dilation = 2 ** (i % layers)
        residual = h
        h = torch.tanh(conv(f"filter_convs.{i}", residual, dilation)) * \
            torch.sigmoid(conv(f"gate_convs.{i}", residual, dilation))
        s = conv(f"skip_convs.{i}", h)
        skip = s if skip is None else s + skip[..., -s.size(3):]
        if i == depth - 1:
            break
        parts = [h]
        for a in adjacency:
            p = h
            for _ in range(order):
                p = torch.einsum("ncvl,vw->ncwl", p, a)
                parts.append(p)
        g = conv(graph_conv.format(i), torch.cat(parts, dim=1))
        h = h + g if improved else g
        h = h + residual[..., -h.size(3):]
        h = F.batch_norm(h, sd[f"bn.{i}.running_mean"], sd[f"bn.{i}.running_var"],
                         sd[f"bn.{i}.weight"], sd[f"bn.{i}.bias"], training=False)
    return conv("end_conv_2", F.relu(conv("end_conv_1", F.relu(skip))))


def ours(model: GWNet, x_ref: torch.Tensor) -> torch.Tensor:
    """Our model on the reference's input layout, in the reference's output layout."""
    return model(x_ref.permute(0, 3, 2, 1)).unsqueeze(-1)


@pytest.mark.parametrize("kernel", ["fast", "dense"])
def test_real_checkpoint_predicts_what_the_reference_does(metr_la, kernel):
    model = load_reference_checkpoint(CHECKPOINT, adj=METR_LA, graph_conv=kernel)
    assert not model.training and model.config.graph_conv == kernel
    sd = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    x = torch.randn(3, 2, 207, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference_forward(sd, x, double_transition(metr_la))
        got = ours(model, x)
    assert expected.shape == got.shape == (3, 12, 207, 1)
    assert (got - expected).abs().max() < 1e-4


def test_real_checkpoint_config_and_unused_weights(metr_la):
    model = load_reference_checkpoint(CHECKPOINT, adj=METR_LA)
    expected = GWNetConfig.improved()
    for field in ("num_nodes", "in_dim", "out_dim", "num_supports", "residual_channels",
                  "dilation_channels", "skip_channels", "end_channels", "blocks", "layers",
                  "kernel_size", "order", "do_graph_conv", "addaptadj", "apt_size", "cat_feat_gc"):
        assert getattr(model.config, field) == getattr(expected, field), field
    assert model.receptive_field == 13
    # 477,912 parameters in the file, of which 24,440 the reference never uses.
    sd = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    in_file = sum(v.numel() for k, v in sd.items() if not k.startswith("bn.") or
                  k.endswith(("weight", "bias")))
    assert in_file == 477_912
    assert sum(p.numel() for p in model.parameters()) == 453_472


def test_real_checkpoint_forecasts_plausible_speeds(metr_la):
    """Realistic scaled input (speed z-score, time of day) gives speeds mostly in 0..80 mph."""
    model = load_reference_checkpoint(CHECKPOINT, adj=METR_LA)
    rng = np.random.default_rng(0)
    mean, std = 54.0, 20.0
    base = rng.uniform(40, 68, size=(4, 1, 207))
    speeds = np.clip(base + rng.normal(0, 3, size=(4, 12, 207)), 0, 80)
    tod = (8 * 12 + np.arange(12))[None, :, None] / 288.0 + np.zeros((4, 1, 207))
    x = torch.tensor(np.stack([(speeds - mean) / std, tod], axis=-1), dtype=torch.float32)
    with torch.no_grad():
        mph = model(x) * std + mean
    assert mph.shape == (4, 12, 207) and torch.isfinite(mph).all()
    assert ((mph >= 0) & (mph <= 80)).float().mean() > 0.95
    # Five minutes ahead, traffic is still close to the last reading.
    assert (mph[:, 0] - torch.from_numpy(speeds[:, -1])).abs().mean() < 8


def test_loading_without_the_graph_is_a_gwnet_error(metr_la):
    with pytest.raises(GWNetError, match="metr-la-improved-gwnet.pth: needs its 2 fixed supports"):
        load_reference_checkpoint(CHECKPOINT)


# --- the original format (Wu et al.), from one of our own models -----------------------------

def small_adj() -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(9, 9, generator=g) * (torch.rand(9, 9, generator=g) < 0.4) + torch.eye(9)).numpy()


def small_original() -> tuple[GWNetConfig, GWNet, list[torch.Tensor]]:
    cfg = GWNetConfig.original(num_nodes=9, residual_channels=6, dilation_channels=6,
                               skip_channels=10, end_channels=12, out_dim=4, apt_size=3)
    supports = double_transition(small_adj())
    torch.manual_seed(0)
    model = GWNet(cfg, supports)
    with torch.no_grad():  # non-trivial batch-norm statistics
        for layer in model.layers[:-1]:
            layer.norm.running_mean.uniform_(-0.5, 0.5)
            layer.norm.running_var.uniform_(0.5, 2.0)
            layer.norm.weight.uniform_(0.5, 1.5)
            layer.norm.bias.uniform_(-0.5, 0.5)
    return cfg, model.eval(), supports


def to_original_format(model: GWNet) -> dict[str, torch.Tensor]:
    """Our state_dict under Wu et al.'s names and shapes, with the modules they never use."""
    conv = lambda w: w[:, :, None, None]
    g = torch.Generator().manual_seed(1)
    sd: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "adaptive":
            sd[parts[1]] = value
        elif parts[0] in ("start_conv", "end_conv_1", "end_conv_2"):
            sd[key] = conv(value) if parts[-1] == "weight" else value
        else:
            i, module, param = parts[1], parts[2], parts[3]
            if module == "temporal":
                half = value.shape[0] // 2
                w = value[:, :, None] if param == "weight" else value
                sd[f"filter_convs.{i}.{param}"], sd[f"gate_convs.{i}.{param}"] = w[:half], w[half:]
            elif module == "skip":
                sd[f"skip_convs.{i}.{param}"] = conv(value) if param == "weight" else value
            elif module == "graph_conv":
                sd[f"gconv.{i}.mlp.mlp.{param}"] = conv(value) if param == "weight" else value
            elif module == "norm":
                sd[f"bn.{i}.{param}"] = value
    depth, c = len(model.layers), model.config.residual_channels
    width = sd["gconv.0.mlp.mlp.weight"].shape[1]
    for i in range(depth):
        sd[f"residual_convs.{i}.weight"] = torch.randn(c, c, 1, 1, generator=g)
        sd[f"residual_convs.{i}.bias"] = torch.randn(c, generator=g)
    last = depth - 1
    sd[f"gconv.{last}.mlp.mlp.weight"] = torch.randn(c, width, 1, 1, generator=g)
    sd[f"gconv.{last}.mlp.mlp.bias"] = torch.randn(c, generator=g)
    for name, value in (("weight", torch.ones(c)), ("bias", torch.zeros(c)),
                        ("running_mean", torch.zeros(c)), ("running_var", torch.ones(c)),
                        ("num_batches_tracked", torch.tensor(0))):
        sd[f"bn.{last}.{name}"] = value
    return sd


@pytest.mark.parametrize("kernel", ["fast", "dense"])
def test_original_format_loads_and_matches(tmp_path, kernel):
    cfg, model, supports = small_original()
    sd = to_original_format(model)
    path = tmp_path / "wu.pth"
    torch.save(sd, path)
    loaded = load_reference_checkpoint(path, supports=supports, graph_conv=kernel)
    for field in ("num_nodes", "in_dim", "out_dim", "num_supports", "residual_channels",
                  "skip_channels", "end_channels", "blocks", "layers", "order", "apt_size",
                  "cat_feat_gc", "addaptadj", "do_graph_conv"):
        assert getattr(loaded.config, field) == getattr(cfg, field), field
    x = torch.randn(5, 2, 9, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference_forward(sd, x, supports)
        assert (ours(loaded, x) - expected).abs().max() < 1e-5
        assert (ours(model, x) - expected).abs().max() < 1e-5


def test_adjacency_given_as_a_matrix_or_a_dcrnn_pickle(tmp_path):
    _, model, _ = small_original()
    path = tmp_path / "wu.pth"
    torch.save(to_original_format(model), path)
    graph = tmp_path / "adj_mx.pkl"
    ids = [f"s{i}" for i in range(9)]
    with open(graph, "wb") as fh:
        pickle.dump([ids, {s: i for i, s in enumerate(ids)}, small_adj()], fh, protocol=2)
    x = torch.randn(2, 12, 9, 2)
    for adj in (small_adj(), graph):
        loaded = load_reference_checkpoint(path, adj=adj)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_order_is_inferred_from_the_supports_given(tmp_path):
    cfg = GWNetConfig.original(num_nodes=9, residual_channels=4, dilation_channels=4,
                               skip_channels=8, end_channels=8, apt_size=3, num_supports=1, order=3)
    adj = np.eye(9, dtype=np.float32)
    model = GWNet(cfg, [torch.from_numpy(adj)])
    path = tmp_path / "order3.pth"
    torch.save(to_original_format(model), path)
    loaded = load_reference_checkpoint(path, adj=adj, adjtype="transition")
    assert (loaded.config.order, loaded.config.num_supports) == (3, 1)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.update(extra=torch.zeros(1)), "unexpected key.*extra"),
    (lambda sd: sd.pop("skip_convs.3.bias"), "missing key.*layers.3.skip.bias"),
    (lambda sd: sd.pop("gate_convs.2.weight"), "layer 2 has a filter but no gate"),
    (lambda sd: sd.update({"bn.2.weight": torch.ones(5)}), "shapes do not match.*layers.2.norm.weight"),
    (lambda sd: sd.update({"end_conv_1.weight": torch.ones(12, 10, 1, 1), "end_conv_2.weight":
                          torch.ones(4, 13, 1, 1)}), "shapes do not match.*end_conv_2.weight"),
])
def test_malformed_checkpoints_are_gwnet_errors(tmp_path, edit, message):
    _, model, supports = small_original()
    sd = to_original_format(model)
    edit(sd)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(GWNetError, match=f"bad.pth: {message}"):
        load_reference_checkpoint(path, supports=supports)


def test_unreadable_files_are_gwnet_errors(tmp_path):
    with pytest.raises(GWNetError, match="no such checkpoint"):
        load_reference_checkpoint(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(GWNetError, match="junk.pth: not a readable PyTorch state_dict"):
        load_reference_checkpoint(junk)
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(GWNetError, match="other.pth: not a Graph WaveNet state_dict"):
        load_reference_checkpoint(other)
    _, model, supports = small_original()
    path = tmp_path / "wu.pth"
    torch.save(to_original_format(model), path)
    with pytest.raises(GWNetError, match="unknown model option"):
        load_reference_checkpoint(path, supports=supports, colour="red")
    with pytest.raises(GWNetError, match="adj or as supports, not both"):
        load_reference_checkpoint(path, adj=small_adj(), supports=supports)
