"""Memory model for --max-memory: byte parsing, the live-tensor counter's closed forms, the fit, the tile choice."""
import pytest
import torch
import torch.nn as nn

from ldm.superres.memory import (LiveTensorBytes, MemoryModel, measure_memory_model, measure_peak_bytes,
                                 parse_bytes, pick_tile_size, tile_size_for_budget)


def test_parse_bytes():
    assert parse_bytes("4GB") == 4 * 10**9 and parse_bytes("4GiB") == 4 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6 and parse_bytes("1.5g") == 1_500_000_000
    assert parse_bytes(" 2 MiB ") == 2 * 2**20 and parse_bytes(4e9) == 4 * 10**9 and parse_bytes("100") == 100
    for bad in ("4 GBs", "GB", "-1GB", "0"):
        with pytest.raises(ValueError, match="memory size"):
            parse_bytes(bad)


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
                         nn.Conv2d(64, 4, 3, padding=1))


@torch.no_grad()
def test_live_tensor_counter_closed_forms():
    net = conv_net()
    x = torch.rand(1, 4, 32, 32)
    # two 64-channel float32 activations are alive at once (conv output and its SiLU)
    assert measure_peak_bytes(lambda: net(x)) == 2 * 64 * 32 * 32 * 4
    lin = nn.Linear(256, 128)
    v = torch.rand(10, 256)
    assert measure_peak_bytes(lambda: lin(v)) == 10 * 128 * 4       # the weight's transposed view is not counted
    with LiveTensorBytes() as counter:
        a = torch.ones(1000)
        b = a * 2
        del a, b
    assert counter.peak == 8000 and counter.current == 0


def test_fit_recovers_known_coefficients():
    truth = MemoryModel(1e6, 300.0, 0.01)
    sides = [8, 16, 24, 32]
    fitted = MemoryModel.fit(sides, [truth.predict(s) for s in sides])
    for s in (8, 64, 128):
        assert abs(fitted.predict(s) - truth.predict(s)) < 1e-6 * truth.predict(s)
    line = MemoryModel.fit([8, 16], [100 + 8 * 64, 100 + 8 * 256], degree=1)
    assert abs(line.c0 - 100) < 1e-6 and abs(line.c1 - 8) < 1e-9 and line.c2 == 0
    with pytest.raises(ValueError, match="at least degree \\+ 1 points"):
        MemoryModel.fit([8, 16], [1, 2], degree=2)


@torch.no_grad()
def test_measured_model_predicts_a_larger_tile():
    net = conv_net()
    model, peaks = measure_memory_model(net, lambda s: torch.rand(1, 4, s, s), sides=(8, 12, 16))
    assert peaks == [2 * 64 * s * s * 4 for s in (8, 12, 16)]
    measured = measure_peak_bytes(lambda: net(torch.rand(1, 4, 48, 48)))
    assert abs(model.predict(48) - measured) < 0.05 * measured


def test_pick_tile_size():
    model = MemoryModel(1e6, 512.0)
    side = pick_tile_size("100MB", model)
    assert side % 8 == 0 and model.predict(side) <= 100e6 < model.predict(side + 8)
    assert pick_tile_size("100MB", model, reserved=50 * 10**6) < side
    assert pick_tile_size("1GB", model, max_tile=256) == 256
    assert pick_tile_size("100MB", model, multiple=64) == side - side % 64
    with pytest.raises(ValueError, match="raise --max-memory"):
        pick_tile_size("1MB", model)


@torch.no_grad()
def test_tile_size_for_budget_measures_then_picks():
    net = conv_net()
    side, model = tile_size_for_budget(net, lambda s: torch.rand(1, 4, s, s), "20MB", sides=(8, 12, 16))
    assert side % 8 == 0 and model.predict(side) <= 20e6 < model.predict(side + 8)
    assert measure_peak_bytes(lambda: net(torch.rand(1, 4, side, side))) <= 20e6
