"""LitEma: warm-up decay formula, CompVis key layout, copy_to/store/restore round trip, ema_scope."""
import pytest
import torch
import torch.nn as nn

from ldm.modules.ema import LitEma, ema_scope


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        self.scale = nn.Parameter(torch.zeros(()))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("stat", torch.zeros(1))


def test_buffer_names_are_parameter_names_without_dots():
    ema = LitEma(Tiny())
    assert set(ema.state_dict()) == {"decay", "num_updates", "block0weight", "block0bias", "block2weight",
                                     "block2bias", "scale"}  # frozen params and buffers are not averaged
    assert ema.num_updates.dtype == torch.int32 and int(ema.num_updates) == 0
    assert float(ema.decay) == pytest.approx(0.9999)


def test_warmup_decay_formula():
    model = Tiny()
    ema = LitEma(model, decay=0.9)
    target, shadow = 1.0, 0.0
    for n in range(1, 40):
        with torch.no_grad():
            model.scale.fill_(target)
        expected_decay = min(0.9, (1 + n) / (10 + n))       # CompVis: n incremented before use
        assert ema.current_decay() == pytest.approx(expected_decay)
        ema(model)
        shadow = shadow - (1 - expected_decay) * (shadow - target)
        assert float(ema.scale) == pytest.approx(shadow, rel=1e-6)
        target += 1.0
    assert int(ema.num_updates) == 39


def test_constant_decay_without_num_updates():
    model = Tiny()
    ema = LitEma(model, decay=0.5, use_num_upates=False)
    with torch.no_grad():
        model.scale.fill_(4.0)
    ema(model)
    ema(model)
    assert float(ema.scale) == pytest.approx(3.0)           # 0 -> 2 -> 3
    assert int(ema.num_updates) == -1


def test_copy_to_store_restore_round_trip():
    model = Tiny()
    ema = LitEma(model, decay=0.0, use_num_upates=False)    # decay 0: EMA == last seen weights
    ema_weights = {k: v.clone() for k, v in model.state_dict().items()}
    ema(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    ema.store(model.parameters())
    ema.copy_to(model)
    for k, v in model.state_dict().items():
        expected = trained[k] if k in ("frozen", "stat") else ema_weights[k]
        assert torch.equal(v, expected), k
    ema.restore(model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_ema_scope_restores_weights_even_on_error():
    model = Tiny()
    ema = LitEma(model)
    with torch.no_grad():
        model.scale.fill_(5.0)
    with ema_scope(ema, model):
        assert model.scale.item() == 0.0
    assert model.scale.item() == 5.0
    with pytest.raises(RuntimeError, match="boom"):
        with ema_scope(ema, model):
            raise RuntimeError("boom")
    assert model.scale.item() == 5.0
    with ema_scope(None, model):
        assert model.scale.item() == 5.0


def test_state_dict_round_trip_and_convergence():
    model = Tiny()
    ema = LitEma(model, decay=0.9)
    with torch.no_grad():
        model.scale.fill_(2.0)
    for _ in range(200):
        ema(model)
    assert float(ema.scale) == pytest.approx(2.0, abs=1e-6)
    other = LitEma(Tiny())
    other.load_state_dict(ema.state_dict())
    assert int(other.num_updates) == 200 and float(other.scale) == pytest.approx(2.0, abs=1e-6)


def test_name_collision_is_an_error():
    class Clash(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Module()
            self.a.bc = nn.Parameter(torch.zeros(1))
            self.ab = nn.Module()
            self.ab.c = nn.Parameter(torch.zeros(1))

    with pytest.raises(ValueError, match="abc"):
        LitEma(Clash())


def test_restore_without_store_is_an_error():
    model = Tiny()
    with pytest.raises(RuntimeError, match="store"):
        LitEma(model).restore(model.parameters())
