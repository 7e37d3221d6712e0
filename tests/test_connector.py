import pytest
import torch
from torch import nn

from modeling_vlmamba import VisionSelectiveScan, VLMambaMultiModalProjector, cross_scan, merge_scans
from vlmamba.training.tiny import tiny_config

SCANS = {"bidirectional": 2, "cross": 4}


@pytest.mark.parametrize("projector_type", ["mlp", "vss_mlp", "vss_l2"])
@pytest.mark.parametrize("scan_type", list(SCANS))
def test_every_connector_maps_vision_features_to_text_width(tokenizer, projector_type, scan_type):
    config = tiny_config(tokenizer, projector_type=projector_type, scan_type=scan_type, vision_feature_layer=[-1, -2])
    torch.manual_seed(0)
    projector = VLMambaMultiModalProjector(config)
    features = torch.randn(3, config.image_seq_length, config.vision_feature_size)
    out = projector(features)
    assert out.shape == (3, config.image_seq_length, config.text_config.hidden_size)
    assert torch.isfinite(out).all()
    assert hasattr(projector, "vss") == (projector_type != "mlp")


class Cumsum(nn.Module):
    """A position-dependent stand-in for the Mamba mixer: each position sums the sequence up to itself."""

    def forward(self, sequences):
        return sequences.cumsum(dim=1)


@pytest.mark.parametrize("scan_type", list(SCANS))
def test_scan_directions_by_hand_with_a_position_dependent_mixer(tokenizer, scan_type):
    config = tiny_config(tokenizer, scan_type=scan_type)
    vss = VisionSelectiveScan(2, config)
    vss.mixer = Cumsum()
    height, width = config.patch_grid
    patches = torch.randn(1, height * width, 2)
    grid = patches.reshape(height, width, 2)
    expected = torch.zeros(height, width, 2)
    for i in range(height):
        for j in range(width):
            expected[i, j] += grid[:i].sum((0, 1)) + grid[i, : j + 1].sum(0)  # row-major, forward
            expected[i, j] += grid[i + 1 :].sum((0, 1)) + grid[i, j:].sum(0)  # row-major, backward
            if scan_type == "cross":
                expected[i, j] += grid[:, :j].sum((0, 1)) + grid[: i + 1, j].sum(0)  # column-major, forward
                expected[i, j] += grid[:, j + 1 :].sum((0, 1)) + grid[i:, j].sum(0)  # column-major, backward
    torch.testing.assert_close(vss(patches), expected.reshape(1, -1, 2))


class Doubling(nn.Module):
    def forward(self, hidden_states):
        return 2 * hidden_states


def test_connector_formulas_by_hand(tokenizer):
    """Each projector_type computes DESIGN.md 3.2, with the VSS replaced by a known function."""
    torch.manual_seed(0)
    for projector_type in ("mlp", "vss_mlp", "vss_l2"):
        projector = VLMambaMultiModalProjector(tiny_config(tokenizer, projector_type=projector_type)).eval()
        features = torch.randn(2, 16, 32)
        linear_1, linear_2, gelu = projector.linear_1, projector.linear_2, torch.nn.functional.gelu
        if projector_type == "mlp":
            expected = linear_2(gelu(linear_1(features)))
        else:
            projector.vss = Doubling()
            norm = projector.norm
            if projector_type == "vss_mlp":  # MLP(LayerNorm(VSS(V) + V))
                expected = linear_2(gelu(linear_1(norm(2 * features + features))))
            else:  # V' = Linear(V); Linear(LayerNorm(VSS(GELU(V')) + V'))
                projected = linear_1(features)
                expected = linear_2(norm(2 * gelu(projected) + projected))
        torch.testing.assert_close(projector(features), expected)


def test_cross_scan_orders():
    grid = torch.arange(2 * 3).reshape(1, 2, 3, 1)  # rows: [0 1 2], [3 4 5]
    bidirectional = cross_scan(grid, "bidirectional")[..., 0].tolist()
    assert bidirectional == [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]]
    cross = cross_scan(grid, "cross")[..., 0].tolist()
    assert cross == [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5], [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]


@pytest.mark.parametrize(("scan_type", "num_directions"), SCANS.items())
def test_merge_scans_inverts_cross_scan_exactly(scan_type, num_directions):
    grid = torch.randn(2, 3, 5, 4)  # a non-square grid catches swapped height and width
    sequences = cross_scan(grid, scan_type)
    assert sequences.shape == (num_directions * 2, 15, 4)
    merged = merge_scans(sequences, 3, 5, scan_type)
    assert torch.equal(merged, num_directions * grid.reshape(2, 15, 4))


@pytest.mark.parametrize(("scan_type", "num_directions"), SCANS.items())
def test_identity_mixer_merges_to_k_times_the_input(tokenizer, scan_type, num_directions):
    config = tiny_config(tokenizer, scan_type=scan_type)
    vss = VisionSelectiveScan(8, config)
    vss.mixer = nn.Identity()
    patches = torch.randn(2, config.image_seq_length, 8)
    assert torch.equal(vss(patches), num_directions * patches)


@pytest.mark.parametrize("scan_type", list(SCANS))
def test_information_flows_both_ways_through_the_scan(tokenizer, scan_type):
    config = tiny_config(tokenizer, scan_type=scan_type)
    torch.manual_seed(0)
    vss = VisionSelectiveScan(8, config).eval()
    patches = torch.randn(1, config.image_seq_length, 8)
    changed = patches.clone()
    changed[:, -1] += 10.0  # the last patch (bottom right)

    with torch.no_grad():
        first_patch_delta = (vss(changed)[:, 0] - vss(patches)[:, 0]).abs().max()
        # One forward direction alone is causal: the first position cannot see the last patch.
        forward_only_delta = (vss.mixer(changed)[:, 0] - vss.mixer(patches)[:, 0]).abs().max()
    assert first_patch_delta > 1e-6
    assert forward_only_delta == 0


def test_scan_rejects_tokens_that_are_not_the_patch_grid(tokenizer):
    config = tiny_config(tokenizer)
    vss = VisionSelectiveScan(8, config)
    with pytest.raises(ValueError, match=r"got 17 tokens per image, which is not the 4x4 patch grid"):
        vss(torch.randn(1, 17, 8))


def test_fresh_connector_mixer_gets_the_mamba_initialisation(model):
    mixer = model.model.multi_modal_projector.vss.mixer
    state_size = mixer.ssm_state_size
    expected_a_log = torch.log(torch.arange(1, state_size + 1, dtype=torch.float32)).expand_as(mixer.A_log)
    torch.testing.assert_close(mixer.A_log, expected_a_log)
    torch.testing.assert_close(mixer.D, torch.ones_like(mixer.D))
    # dt = softplus(bias) starts inside [time_step_min, time_step_max] = [1e-3, 0.1]
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert torch.count_nonzero(mixer.conv1d.bias) == 0
    connector = model.model.multi_modal_projector
    assert torch.count_nonzero(connector.linear_1.bias) == 0 and torch.count_nonzero(connector.linear_2.bias) == 0
    assert 0.015 < connector.linear_2.weight.std() < 0.025  # normal(0, initializer_range=0.02)
    torch.testing.assert_close(connector.norm.weight, torch.ones_like(connector.norm.weight))
