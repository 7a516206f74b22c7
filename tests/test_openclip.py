"""FrozenOpenCLIPEmbedder: SD 2.x's OpenCLIP text tower (keys, tokens, penultimate layer + ln_final, causal
attention), weights from an OpenCLIP file or from a checkpoint, and the errors offline."""
import importlib.util
import sys

import huggingface_hub.constants
import pytest
import torch

from ldm.checkpoint import save_checkpoint_atomic
from ldm.modules.encoders import FrozenOpenCLIPEmbedder
from ldm.modules.encoders.openclip import EOT, SOT
from ldm.util import ConfigError
from tests.stablesr_layouts import openclip_layout
from tests.test_compat import clip_folder
from tests.test_ddpm import single_thread  # noqa: F401 - autouse fixture

TINY = {"width": 32, "layers": 3, "heads": 2, "embed_dim": 16}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def tiny(layer="penultimate", seed=0, **kw):
    torch.manual_seed(seed)
    return FrozenOpenCLIPEmbedder(arch=TINY, layer=layer, pretrained=False, **kw)


def test_keys_are_sd2_openclip_keys_and_the_encoder_is_frozen():
    emb = tiny()
    assert {k: tuple(v.shape) for k, v in emb.model.state_dict().items()} == openclip_layout(
        width=32, layers=3, embed=16)
    assert not any(p.requires_grad for p in emb.parameters()) and not emb.train().model.training
    assert emb.output_dim == 32


def test_empty_prompt_tokens_need_no_vocabulary():
    tokens = tiny().tokenize(["", ""])
    assert tokens.shape == (2, 77) and tokens[:, :2].tolist() == [[SOT, EOT]] * 2 and not tokens[:, 2:].any()


def test_penultimate_skips_the_last_block_then_applies_ln_final_and_attention_is_causal():
    emb, last = tiny("penultimate"), tiny("last")
    last.load_state_dict(emb.state_dict())
    tokens = torch.randint(0, 49408, (2, 77))
    tower = emb.model
    x = tower.token_embedding(tokens) + tower.positional_embedding
    mask = torch.full((77, 77), float("-inf")).triu(1)
    hidden = []
    for block in tower.transformer.resblocks:
        y = block.ln_1(x)
        x = x + block.attn(y, y, y, attn_mask=mask, need_weights=False)[0]
        x = x + block.mlp(block.ln_2(x))
        hidden.append(x)
    torch.testing.assert_close(tower(tokens, skip_last=1), tower.ln_final(hidden[-2]))
    torch.testing.assert_close(tower(tokens, skip_last=0), tower.ln_final(hidden[-1]))
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 49408
    a, b = tower(tokens, 1), tower(changed, 1)
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5:], b[:, 5:])
    torch.testing.assert_close(emb([""]), tower(emb.tokenize([""]), 1))
    assert not torch.allclose(emb([""]), last([""]))


def test_weights_from_an_openclip_file_and_the_offline_error(tmp_path):
    src = tiny(seed=1)
    sd = dict(src.model.state_dict()) | {"visual.conv1.weight": torch.zeros(2), "attn_mask": torch.zeros(77, 77)}
    save_checkpoint_atomic(sd, tmp_path / "open_clip_pytorch_model.bin")
    emb = FrozenOpenCLIPEmbedder(arch=TINY, version=str(tmp_path / "open_clip_pytorch_model.bin"))
    assert all(torch.equal(v, src.model.state_dict()[k]) for k, v in emb.model.state_dict().items())
    with pytest.raises(FileNotFoundError, match="(?s)no pretrained weights for ViT-H-14 / 'laion2b_s32b_b79k'.*"
                                                "hf download laion/CLIP-ViT-H-14-laion2B-s32b-b79k "
                                                "open_clip_pytorch_model.bin.*pretrained: false"):
        FrozenOpenCLIPEmbedder(layer="penultimate")                  # SD 2.x's params, nothing cached here
    save_checkpoint_atomic({"token_embedding.weight": torch.zeros(3, 3)}, tmp_path / "other.bin")
    with pytest.raises(RuntimeError, match="other.bin' does not fit"):
        FrozenOpenCLIPEmbedder(arch=TINY, version=str(tmp_path / "other.bin"))


def test_prompts_need_a_vocabulary_a_tokenizer_folder_gives_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)                   # as if open-clip-torch were absent
    with pytest.raises(ConfigError, match="prompts other than '' need the CLIP BPE vocabulary: pip install "
                                          "open-clip-torch"):
        tiny()(["a cat"])
    emb = tiny(tokenizer=clip_folder(tmp_path, weights=False, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, vocab_size=64))
    tokens = emb.tokenize(["ab", "z" * 200])
    assert tokens[0, :4].tolist() == [52, 0, 27, 53] and not tokens[0, 4:].any()  # BOS a b</w> EOS, 0-padded
    assert tokens[1, 0] == 52 and tokens[1, -1] == EOT and tokens[1].ne(0).all()    # cut, ending in EOT
    assert emb(["ab"]).shape == (1, 77, 32)


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open-clip-torch is not installed")
def test_same_tokens_and_features_as_open_clip():
    """Our tower loads an OpenCLIP text tower's weights as they are and computes SD 2.x's features from them."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    reference = CLIP(embed_dim=16, vision_cfg=vision,
                     text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=3)).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    emb = FrozenOpenCLIPEmbedder(arch=TINY, pretrained=False, layer="penultimate")
    emb.model.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("visual.")
                               and k != "attn_mask"})
    prompts = ["a photograph of an astronaut riding a horse", "", "x " * 100]
    tokens = open_clip.tokenize(prompts)
    assert torch.equal(emb.tokenize(prompts), tokens)
    with torch.no_grad():
        x = reference.token_embedding(tokens) + reference.positional_embedding
        batch_first = getattr(reference.transformer, "batch_first", True)
        x = x if batch_first else x.permute(1, 0, 2)
        for block in reference.transformer.resblocks[:-1]:              # SD 2.x: layer_idx 1 = penultimate
            x = block(x, attn_mask=reference.attn_mask)
        x = reference.ln_final(x if batch_first else x.permute(1, 0, 2))
    torch.testing.assert_close(emb(prompts), x, rtol=1e-5, atol=1e-5)


def test_cache_and_config_errors():
    plain, cached = tiny(), tiny(cache_size=2)
    cached.load_state_dict(plain.state_dict())
    calls = []
    cached.model.register_forward_hook(lambda *args: calls.append(1))
    assert torch.equal(cached(["", ""]), plain(["", ""])) and torch.equal(cached([""]), plain([""]))
    assert len(calls) == 1
    with pytest.raises(ConfigError, match="always reads 77 tokens"):
        tiny(max_length=64)
    with pytest.raises(ConfigError, match="layer must be one of"):
        tiny(layer="pooled")
    with pytest.raises(ConfigError, match="arch 'RN50' is not known"):
        FrozenOpenCLIPEmbedder(arch="RN50", pretrained=False)
    assert tiny().null_condition(3) == ["", "", ""]
