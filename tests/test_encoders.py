"""Conditioners: shapes, the packaged MiniLM offline, freezing, CLIP key layout, tokenisation, gradients."""
import huggingface_hub.constants
import pytest
import torch
from transformers import CLIPTextConfig

from ldm.modules.encoders import (ClassEmbedder, FrozenTextEmbedder, LayoutEmbedder, SpatialRescaler,
                                  TransformerTextEmbedder)
from ldm.modules.encoders.layout import corner_tokens, rasterize_boxes
from ldm.util import ConfigError, instantiate_from_config


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this test (huggingface_hub reads the variable at import, so patch both)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def minilm():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        return FrozenTextEmbedder(max_length=16)


def tiny_clip_config() -> CLIPTextConfig:
    return CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=30522, max_position_embeddings=77, bos_token_id=101, eos_token_id=102,
                          pad_token_id=0)


# ClassEmbedder ------------------------------------------------------------------------------------------

def test_class_embedder_shapes_and_batch_dict():
    emb = ClassEmbedder(embed_dim=8, n_classes=10)
    labels = torch.tensor([0, 3, 9])
    out = emb(labels)
    assert out.shape == (3, 1, 8) and out.dtype == torch.float32
    assert torch.equal(emb.encode({"class_label": labels}), out)
    assert torch.equal(out[1, 0], emb.embedding.weight[3])


def test_class_embedder_null_class():
    emb = ClassEmbedder(embed_dim=8, n_classes=10, add_null_class=True)
    assert emb.embedding.weight.shape == (11, 8)
    null = emb.null_condition(4)
    assert null.dtype == torch.long and null.tolist() == [10] * 4
    assert torch.equal(emb(null)[:, 0], emb.embedding.weight[10].expand(4, 8))
    assert torch.equal(emb.unconditional(2), null[:2])


def test_class_embedder_compvis_layout_and_errors():
    emb = ClassEmbedder(embed_dim=8, n_classes=10)
    assert list(emb.state_dict()) == ["embedding.weight"] and emb.embedding.weight.shape == (10, 8)
    with pytest.raises(ConfigError, match="add_null_class"):
        emb.null_condition(2)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        emb(torch.tensor([10]))
    with pytest.raises(KeyError, match="class_label"):
        emb({"caption": ["x"]})


# FrozenTextEmbedder (packaged MiniLM) ------------------------------------------------------------------

def test_minilm_embeddings_offline(minilm):
    out = minilm(["a red circle", "a blue square", "a red circle"])
    assert out.shape == (3, 16, 384) and out.dtype == torch.float32 and minilm.output_dim == 384
    assert torch.allclose(out[0], out[2])
    assert not torch.allclose(out[0], out[1], atol=1e-3)


def test_minilm_pads_and_truncates_to_max_length(minilm):
    tokens = minilm.tokenize(["a red circle", "word " * 100])
    assert tokens["input_ids"].shape == (2, 16)
    assert tokens["attention_mask"][0].tolist() == [1] * 5 + [0] * 11   # [CLS] a red circle [SEP] + pads
    assert tokens["attention_mask"][1].sum() == 16


def test_minilm_null_condition_is_empty_caption(minilm):
    null = minilm.null_condition(2)
    assert null == ["", ""]
    assert minilm(null).shape == (2, 16, 384)


def test_minilm_frozen_stays_eval(minilm):
    assert all(not p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert minilm.training and not minilm.transformer.training
    assert not any(m.training for m in minilm.transformer.modules())
    assert not minilm(["a red circle"]).requires_grad
    minilm.eval()


def test_hub_id_offline_gives_clear_error(offline):
    with pytest.raises(OSError, match="could not be found in the local Hugging Face cache.*local folder"):
        FrozenTextEmbedder(version="openai/clip-vit-large-patch14", model_class="clip")


def test_text_embedder_config_errors():
    with pytest.raises(ConfigError, match="model_class"):
        FrozenTextEmbedder(model_class="t5")
    with pytest.raises(ConfigError, match="layer"):
        FrozenTextEmbedder(layer="first")


# FrozenTextEmbedder (tiny random CLIP, SD 1.x layout) -------------------------------------------------

def test_tiny_random_clip_keys_and_shape(offline):
    emb = FrozenTextEmbedder(version=tiny_clip_config(), model_class="clip", pretrained=False)
    keys = list(emb.state_dict())
    assert all(k.startswith("transformer.") for k in keys)
    assert "transformer.embeddings.token_embedding.weight" in keys or \
        "transformer.text_model.embeddings.token_embedding.weight" in keys
    assert not any("tokenizer" in k for k in keys)
    out = emb(["a red circle", ""])
    assert out.shape == (2, 77, 32)
    assert emb.tokenize(["a"])["input_ids"].shape == (1, 77)


def test_clip_loads_sd_layout_keys_strictly(offline):
    """Published SD 1.x files name keys `transformer.text_model.*` and may carry position_ids."""
    src = FrozenTextEmbedder(version=tiny_clip_config(), model_class="clip", pretrained=False)
    dst = FrozenTextEmbedder(version=tiny_clip_config(), model_class="clip", pretrained=False)
    sd_layout = {}
    for key, value in src.state_dict().items():
        local = key[len("transformer."):].removeprefix("text_model.")
        sd_layout["transformer.text_model." + local] = value
    sd_layout["transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    dst.load_state_dict(sd_layout, strict=True)
    text = ["a red circle"]
    assert torch.equal(dst(text), src(text))


def test_tokenizer_larger_than_vocab_is_an_error(offline):
    config = tiny_clip_config()
    config.vocab_size = 1000
    with pytest.raises(ConfigError, match="vocab_size is 1000"):
        FrozenTextEmbedder(version=config, model_class="clip", pretrained=False)


def test_clip_penultimate_layer(offline):
    last = FrozenTextEmbedder(version=tiny_clip_config(), model_class="clip", pretrained=False, max_length=8)
    pen = FrozenTextEmbedder(version=tiny_clip_config(), model_class="clip", pretrained=False,
                             layer="penultimate", max_length=8)
    pen.load_state_dict(last.state_dict())
    tokens = last.tokenize(["a red circle"])["input_ids"]
    hidden = last.transformer(input_ids=tokens, output_hidden_states=True).hidden_states
    assert torch.equal(pen(["a red circle"]), hidden[1])                 # output of layer 1 of 2
    assert not torch.allclose(pen(["a red circle"]), last(["a red circle"]))


def test_random_model_from_config_folder(offline, tmp_path):
    tiny_clip_config().save_pretrained(tmp_path)
    config = {"target": "ldm.modules.encoders.FrozenTextEmbedder",
              "params": {"version": str(tmp_path), "model_class": "clip", "pretrained": False, "max_length": 10}}
    emb = instantiate_from_config(config)
    assert emb(["a", "b"]).shape == (2, 10, 32) and emb.output_dim == 32


def test_caption_cache_gives_the_same_features_and_encodes_each_caption_once(offline):
    plain = FrozenTextEmbedder(version=tiny_clip_config(), model_class="clip", pretrained=False, max_length=8)
    cached = FrozenTextEmbedder(version=tiny_clip_config(), model_class="clip", pretrained=False, max_length=8,
                                cache_size=2)
    cached.load_state_dict(plain.state_dict())
    calls = []
    cached.transformer.register_forward_hook(lambda module, args, kwargs_out: calls.append(1))
    text = ["a red circle", "a blue star", "a red circle"]
    assert torch.equal(cached(text), plain(text)) and len(calls) == 1
    assert torch.equal(cached(["a blue star"]), plain(["a blue star"])) and len(calls) == 1   # cached
    cached(["a green square"])                            # evicts the least recently used: "a red circle"
    assert list(cached._cache) == ["a blue star", "a green square"] and len(calls) == 2
    cached.load_state_dict(FrozenTextEmbedder(version=tiny_clip_config(), model_class="clip",
                                              pretrained=False, max_length=8).state_dict())
    assert not cached._cache                             # new weights: nothing stale
    with pytest.raises(TypeError, match="list of captions"):
        cached([["a nested list"]])
    with pytest.raises(ConfigError, match="cache_size"):
        FrozenTextEmbedder(version=tiny_clip_config(), model_class="clip", pretrained=False, freeze=False,
                           cache_size=4)


def test_pretrained_folder_saved_in_fp16_loads_as_float32(offline, tmp_path, minilm):
    from transformers import BertConfig, BertModel
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    BertModel(config).half().save_pretrained(tmp_path)
    minilm.tokenizer.save_pretrained(tmp_path)
    emb = FrozenTextEmbedder(version=str(tmp_path), max_length=8)
    assert {p.dtype for p in emb.parameters()} == {torch.float32}
    assert emb(["a red circle"]).dtype == torch.float32


# TransformerTextEmbedder -------------------------------------------------------------------------------

def test_transformer_text_embedder_shapes_and_grads(offline):
    emb = TransformerTextEmbedder(n_embed=32, n_layer=2, max_seq_len=12, heads=2, dim_head=16)
    out = emb(["a red circle", "a blue square"])
    assert out.shape == (2, 12, 32) and out.dtype == torch.float32
    out.pow(2).mean().backward()
    grads = [p.grad for p in emb.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert emb.transformer.attn_layers.layers[0][1].to_q.weight.grad.abs().sum() > 0
    assert emb.null_condition(3) == ["", "", ""]


def test_transformer_text_embedder_compvis_keys_and_token_input():
    emb = TransformerTextEmbedder(n_embed=16, n_layer=1, vocab_size=50, max_seq_len=6, use_tokenizer=False,
                                  heads=2, dim_head=8)
    keys = set(emb.state_dict())
    assert {"transformer.token_emb.weight", "transformer.pos_emb.emb.weight",
            "transformer.attn_layers.layers.0.0.weight", "transformer.attn_layers.layers.0.1.to_q.weight",
            "transformer.attn_layers.layers.0.1.to_out.bias", "transformer.attn_layers.layers.1.1.net.0.0.weight",
            "transformer.attn_layers.layers.1.1.net.2.weight", "transformer.norm.weight"} <= keys
    assert "transformer.attn_layers.layers.0.1.to_q.bias" not in keys
    state = dict(emb.state_dict())
    state["transformer.to_logits.weight"] = torch.zeros(50, 16)                  # CompVis' unused head
    state["transformer.to_logits.bias"] = torch.zeros(50)
    emb.load_state_dict(state, strict=True)
    tokens = torch.tensor([[1, 2, 3, 0, 0, 0]])
    assert emb(tokens).shape == (1, 6, 16)
    assert emb.null_condition(2).tolist() == [[0] * 6] * 2
    with pytest.raises(ValueError, match="vocab_size"):
        emb(torch.tensor([[50]]))


def test_transformer_text_embedder_from_compvis_params(offline):
    config = {"target": "ldm.modules.encoders.TransformerTextEmbedder",
              "params": {"n_embed": 16, "n_layer": 1, "vocab_size": 30522, "max_seq_len": 8,
                         "use_tokenizer": True, "embedding_dropout": 0.1, "heads": 2, "dim_head": 8}}
    emb = instantiate_from_config(config)
    assert emb(["a"]).shape == (1, 8, 16)
    with pytest.raises(ConfigError, match="vocab_size"):
        TransformerTextEmbedder(n_embed=16, n_layer=1, vocab_size=100)


# LayoutEmbedder ----------------------------------------------------------------------------------------

def tiny_layout(**kw) -> LayoutEmbedder:
    return LayoutEmbedder(n_embed=16, n_layer=1, n_classes=5, n_coord_bins=4, max_objects=4,
                          heads=2, dim_head=8, **kw)


def test_corner_token_hand_case():
    x = torch.tensor([0.0, 0.3, 0.99, 1.0, 0.25])
    y = torch.tensor([0.0, 0.8, 0.0, 1.0, 0.5])
    # bins=4: cells floor(v*4), 1.0 -> last cell; token = y*4 + x
    assert corner_tokens(x, y, 4).tolist() == [0, 3 * 4 + 1, 3, 15, 2 * 4 + 1]


def test_layout_tokenize_hand_case():
    layout = tiny_layout()
    objects = torch.tensor([[[2, 0.3, 0.8, 1.0, 1.0],
                             [-1, 0.0, 0.0, 0.0, 0.0]]])
    pad = 4 * 4 + 5
    assert layout.pad_token == pad
    expected = [16 + 2, 13, 15] + [pad] * 9
    assert layout.tokenize(objects).tolist() == [expected]


def test_layout_shapes_grads_and_null():
    layout = tiny_layout()
    objects = torch.tensor([[[0, 0.1, 0.1, 0.5, 0.5], [4, 0.5, 0.2, 0.9, 0.7]]])
    out = layout(objects)
    assert out.shape == (1, 12, 16) and out.dtype == torch.float32
    out.sum().backward()
    assert all(p.grad is not None for p in layout.parameters())
    null = layout.null_condition(3)
    assert null.shape == (3, 4, 5) and (null[..., 0] == -1).all()
    assert (layout.tokenize(null) == layout.pad_token).all()
    assert not torch.allclose(layout(null[:1]), out)


def test_layout_invariant_to_padding_rows():
    layout = tiny_layout().eval()
    a, b = [1, 0.1, 0.2, 0.4, 0.6], [3, 0.5, 0.5, 0.9, 0.9]
    pad = [-1, 0, 0, 0, 0]
    compact = torch.tensor([[a, b]])
    spread = torch.tensor([[pad, a, pad, b]])
    assert torch.equal(layout.tokenize(compact), layout.tokenize(spread))
    assert torch.allclose(layout(compact), layout(spread))
    swapped = torch.tensor([[b, a]])
    assert not torch.allclose(layout(compact), layout(swapped))


def test_layout_bad_input():
    layout = tiny_layout()
    with pytest.raises(ValueError, match="max_objects"):
        layout(torch.zeros(1, 5, 5))
    with pytest.raises(ValueError, match="classes"):
        layout(torch.tensor([[[5, 0, 0, 1, 1.0]]]))
    with pytest.raises(ValueError, match=r"\(B, n, 5\)"):
        layout(torch.zeros(1, 4))


def test_rasterize_boxes_hand_case_padding_overlap_and_empty():
    objects = torch.tensor([[[1, 0.0, 0.0, 0.5, 0.5], [1, 0.25, 0.25, 0.75, 0.75], [3, 0.5, 0.25, 1.0, 1.0],
                             [-1, 0.0, 0.0, 1.0, 1.0]]])
    raster = rasterize_boxes(objects, n_classes=4, size=4)             # pixel centres 1/8, 3/8, 5/8, 7/8
    assert raster.shape == (1, 4, 4, 4)
    assert raster[0, 1].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]  # overlap stays 1
    assert raster[0, 3].tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert raster[0, 0].sum() == 0 and raster[0, 2].sum() == 0        # padding rows draw nothing
    assert rasterize_boxes(torch.zeros(2, 0, 5), 4, 3).shape == (2, 4, 3, 3)


def test_layout_with_raster_size_returns_tokens_and_map():
    layout = tiny_layout(raster_size=4)
    objects = torch.tensor([[[2, 0.0, 0.5, 0.5, 1.0]]])
    out = layout(objects)
    assert set(out) == {"c_crossattn", "c_concat"} and layout.condition_keys == ("c_crossattn", "c_concat")
    assert torch.equal(out["c_crossattn"], layout.transformer(layout.tokenize(objects)))
    assert torch.equal(out["c_concat"], rasterize_boxes(objects, 5, 4))
    with pytest.raises(ConfigError, match="raster_size"):
        tiny_layout(raster_size=0)


# SpatialRescaler ---------------------------------------------------------------------------------------

def test_rescaler_size_and_channel_mapper():
    resc = SpatialRescaler(n_stages=2, multiplier=0.5, in_channels=3, out_channels=4)
    out = resc(torch.randn(2, 3, 32, 24))
    assert out.shape == (2, 4, 8, 6)
    assert list(resc.state_dict()) == ["channel_mapper.weight"]
    plain = SpatialRescaler(n_stages=1, method="nearest", multiplier=2)
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(plain(x)[..., ::2, ::2], x)


def test_rescaler_area_mean_closed_form():
    resc = SpatialRescaler(n_stages=1, method="area", multiplier=0.5)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert resc(x)[0, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]


def test_rescaler_one_hot_segmentation():
    resc = SpatialRescaler(n_stages=1, method="nearest", multiplier=0.5, n_classes=3)
    seg = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]]])
    out = resc(seg)
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.float32
    assert out.argmax(1).tolist() == [[[0, 1], [2, 2]]]
    assert torch.equal(out.sum(1), torch.ones(1, 2, 2))
    with pytest.raises(ConfigError, match="n_classes"):
        SpatialRescaler()(seg)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        resc(seg + 1)
    with pytest.raises(ConfigError, match="method"):
        SpatialRescaler(method="cubic")
