"""The state-dict layouts of published CompVis / SD checkpoints, derived by rule from their YAML hyper-parameters.

Each function writes key -> shape as the ORIGINAL code names its modules (CompVis latent-diffusion / SD 1.x:
openaimodel.UNetModel, diffusionmodules.model.Encoder/Decoder, taming's LPIPS and NLayerDiscriminator,
x_transformer.TransformerWrapper behind BERTEmbedder, HF CLIPTextModel, LitEma), never from our modules, so a
test that loads such a state dict strictly checks our model against the original layout. Also the shared helpers
of the compat tests: parameters on the meta device, a local CLIP folder, tensors for a layout.
"""
import contextlib
import json
from typing import Any, Mapping
from unittest import mock

import torch
import torch.nn as nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

Layout = dict[str, tuple[int, ...]]
# the 12 DDPM schedule buffers of every published diffusion checkpoint (REFERENCE.md §2)
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
# torchvision VGG16 `features` index -> (out, in) channels of its 13 convs, and LPIPS' five slices of it
VGG16_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
               14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512),
               28: (512, 512)}
LPIPS_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


# ---- building blocks ---------------------------------------------------------------------------------------------
def conv(out: Layout, p: str, c_in: int, c_out: int, k: int, bias: bool = True, dims: int = 2) -> None:
    out[f"{p}.weight"] = (c_out, c_in) + (k,) * dims
    if bias:
        out[f"{p}.bias"] = (c_out,)


def linear(out: Layout, p: str, c_in: int, c_out: int, bias: bool = True) -> None:
    out[f"{p}.weight"] = (c_out, c_in)
    if bias:
        out[f"{p}.bias"] = (c_out,)


def norm(out: Layout, p: str, c: int) -> None:
    out[f"{p}.weight"], out[f"{p}.bias"] = (c,), (c,)


def prefixed(prefix: str, layout: Mapping[str, tuple]) -> Layout:
    return {prefix + k: v for k, v in layout.items()}


# ---- U-Net (openaimodel.UNetModel) -------------------------------------------------------------------------------
def unet_layout(u: Mapping[str, Any]) -> Layout:
    """openaimodel.UNetModel(**unet_config.params), with the original's defaults."""
    out: Layout = {}
    mc, mults, nrb = u["model_channels"], list(u.get("channel_mult", (1, 2, 4, 8))), u["num_res_blocks"]
    emb, scale_shift, updown = 4 * mc, u.get("use_scale_shift_norm", False), u.get("resblock_updown", False)

    def res(p: str, c_in: int, c_out: int) -> None:
        norm(out, f"{p}.in_layers.0", c_in), conv(out, f"{p}.in_layers.2", c_in, c_out, 3)
        linear(out, f"{p}.emb_layers.1", emb, 2 * c_out if scale_shift else c_out)
        norm(out, f"{p}.out_layers.0", c_out), conv(out, f"{p}.out_layers.3", c_out, c_out, 3)
        if c_in != c_out:
            conv(out, f"{p}.skip_connection", c_in, c_out, 1)

    linear(out, "time_embed.0", mc, emb), linear(out, "time_embed.2", emb, emb)
    if u.get("num_classes") is not None:
        out["label_emb.weight"] = (u["num_classes"], emb)
    conv(out, "input_blocks.0.0", u["in_channels"], mc, 3)
    skips, ch, ds, n = [mc], mc, 1, 1
    for level, mult in enumerate(mults):
        for _ in range(nrb):
            res(f"input_blocks.{n}.0", ch, mult * mc)
            ch = mult * mc
            if ds in u["attention_resolutions"]:
                _attention(out, f"input_blocks.{n}.1", ch, u)
            skips.append(ch)
            n += 1
        if level < len(mults) - 1:
            res(f"input_blocks.{n}.0", ch, ch) if updown else conv(out, f"input_blocks.{n}.0.op", ch, ch, 3)
            skips.append(ch)
            n, ds = n + 1, ds * 2
    res("middle_block.0", ch, ch), _attention(out, "middle_block.1", ch, u), res("middle_block.2", ch, ch)
    n = 0
    for level in reversed(range(len(mults))):
        for i in range(nrb + 1):
            res(f"output_blocks.{n}.0", ch + skips.pop(), mults[level] * mc)
            ch, index = mults[level] * mc, 1
            if ds in u["attention_resolutions"]:
                _attention(out, f"output_blocks.{n}.1", ch, u)
                index = 2
            if level and i == nrb:
                up = f"output_blocks.{n}.{index}"
                res(up, ch, ch) if updown else conv(out, f"{up}.conv", ch, ch, 3)
                ds //= 2
            n += 1
    norm(out, "out.0", ch), conv(out, "out.2", mc, u["out_channels"], 3)
    return out


def _attention(out: Layout, p: str, ch: int, u: Mapping[str, Any]) -> None:
    """AttentionBlock (qkv as a 1x1 Conv1d) or, with use_spatial_transformer, a SpatialTransformer."""
    if not u.get("use_spatial_transformer", False):
        norm(out, f"{p}.norm", ch), conv(out, f"{p}.qkv", ch, 3 * ch, 1, dims=1)
        conv(out, f"{p}.proj_out", ch, ch, 1, dims=1)
        return
    heads, head_channels = u.get("num_heads", -1), u.get("num_head_channels", -1)
    if head_channels == -1:
        dim_head = ch // heads
    else:
        heads, dim_head = ch // head_channels, head_channels
    if u.get("legacy", True):
        dim_head = ch // heads
    inner, context = heads * dim_head, u.get("context_dim") or heads * dim_head
    norm(out, f"{p}.norm", ch), conv(out, f"{p}.proj_in", ch, inner, 1)
    for k in range(u.get("transformer_depth", 1)):
        block = f"{p}.transformer_blocks.{k}"
        for name, c_kv in (("attn1", inner), ("attn2", context)):
            linear(out, f"{block}.{name}.to_q", inner, inner, bias=False)
            linear(out, f"{block}.{name}.to_k", c_kv, inner, bias=False)
            linear(out, f"{block}.{name}.to_v", c_kv, inner, bias=False)
            linear(out, f"{block}.{name}.to_out.0", inner, inner)
        linear(out, f"{block}.ff.net.0.proj", inner, 8 * inner), linear(out, f"{block}.ff.net.2", 4 * inner, inner)
        for name in ("norm1", "norm2", "norm3"):
            norm(out, f"{block}.{name}", inner)
    conv(out, f"{p}.proj_out", inner, ch, 1)


# ---- first stages (diffusionmodules.model.Encoder/Decoder, AutoencoderKL, VQModel) -------------------------------
def autoencoder_layout(ch, ch_mult, num_res_blocks, z_channels, embed_dim, double_z=True, n_embed=None,
                       attn_resolutions=(), resolution=256, in_channels=3, out_ch=3, attn_type="vanilla",
                       **_ignored) -> Layout:
    """First-stage key -> shape: encoder, decoder, quant_conv, post_quant_conv (and quantize.* for VQ, n_embed)."""
    out: Layout = {}
    attn = attn_type != "none"

    def resnet(p: str, c_in: int, c_out: int) -> None:
        norm(out, f"{p}.norm1", c_in), conv(out, f"{p}.conv1", c_in, c_out, 3), norm(out, f"{p}.norm2", c_out)
        conv(out, f"{p}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(out, f"{p}.nin_shortcut", c_in, c_out, 1)

    def attn_block(p: str, c: int) -> None:
        if attn:
            norm(out, f"{p}.norm", c)
            for name in ("q", "k", "v", "proj_out"):
                conv(out, f"{p}.{name}", c, c, 1)

    def mid(p: str, c: int) -> None:
        resnet(f"{p}.block_1", c, c), attn_block(f"{p}.attn_1", c), resnet(f"{p}.block_2", c, c)

    z_out = 2 * z_channels if double_z else z_channels
    conv(out, "encoder.conv_in", in_channels, ch, 3)
    c, res = ch, resolution
    for level, mult in enumerate(ch_mult):
        for b in range(num_res_blocks):
            resnet(f"encoder.down.{level}.block.{b}", c, ch * mult)
            c = ch * mult
            if res in attn_resolutions:
                attn_block(f"encoder.down.{level}.attn.{b}", c)
        if level < len(ch_mult) - 1:
            conv(out, f"encoder.down.{level}.downsample.conv", c, c, 3)
            res //= 2
    mid("encoder.mid", c), norm(out, "encoder.norm_out", c), conv(out, "encoder.conv_out", c, z_out, 3)
    conv(out, "decoder.conv_in", z_channels, c, 3), mid("decoder.mid", c)
    for level in reversed(range(len(ch_mult))):
        for b in range(num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{b}", c, ch * ch_mult[level])
            c = ch * ch_mult[level]
            if res in attn_resolutions:
                attn_block(f"decoder.up.{level}.attn.{b}", c)
        if level > 0:
            conv(out, f"decoder.up.{level}.upsample.conv", c, c, 3)
            res *= 2
    norm(out, "decoder.norm_out", c), conv(out, "decoder.conv_out", c, out_ch, 3)
    conv(out, "quant_conv", z_out, embed_dim * (2 if double_z else 1), 1)
    conv(out, "post_quant_conv", embed_dim, z_channels, 1)
    if n_embed:
        out["quantize.embedding.weight"] = (n_embed, embed_dim)
    return out


def loss_layout(lossconfig: Mapping[str, Any]) -> Layout:
    """`loss.*` of a first-stage training file: LPIPS (VGG16 slices, lin0-4, scaling buffers), the PatchGAN
    discriminator (BatchNorm, disc_num_layers) and, for the KL loss, the learned logvar. None for other targets."""
    target, params = lossconfig["target"], lossconfig.get("params") or {}
    if not target.endswith("LPIPSWithDiscriminator"):
        return {}
    out: Layout = {"loss.logvar": ()} if not target.endswith("VQLPIPSWithDiscriminator") else {}
    out["loss.perceptual_loss.scaling_layer.shift"] = out["loss.perceptual_loss.scaling_layer.scale"] = (1, 3, 1, 1)
    for s, (lo, hi) in enumerate(LPIPS_SLICES, start=1):
        for index, (c_out, c_in) in VGG16_CONVS.items():
            if lo <= index < hi:
                conv(out, f"loss.perceptual_loss.net.slice{s}.{index}", c_in, c_out, 3)
    for i, c in enumerate((64, 128, 256, 512, 512)):
        out[f"loss.perceptual_loss.lin{i}.model.1.weight"] = (1, c, 1, 1)
    ndf, layers = params.get("disc_ndf", 64), params.get("disc_num_layers", 3)
    p = "loss.discriminator.main"
    conv(out, f"{p}.0", params.get("disc_in_channels", 3), ndf, 4)
    index, mult = 2, 1
    for n in range(1, layers + 1):
        prev, mult = mult, min(2 ** n, 8)
        conv(out, f"{p}.{index}", ndf * prev, ndf * mult, 4, bias=False)
        norm(out, f"{p}.{index + 1}", ndf * mult)
        out[f"{p}.{index + 1}.running_mean"] = out[f"{p}.{index + 1}.running_var"] = (ndf * mult,)
        out[f"{p}.{index + 1}.num_batches_tracked"] = ()
        index += 3
    conv(out, f"{p}.{index}", ndf * mult, 1, 4)
    return out


def first_stage_layout(config: Mapping[str, Any], with_loss: bool = True) -> Layout:
    """AutoencoderKL / VQModel(Interface) {target, params}: the autoencoder, and its training loss' keys."""
    params = config["params"]
    ae = autoencoder_layout(**params["ddconfig"], embed_dim=params["embed_dim"], n_embed=params.get("n_embed"))
    return ae | (loss_layout(params["lossconfig"]) if with_loss else {})


# ---- conditioners ------------------------------------------------------------------------------------------------
def clip_layout(hidden_size, intermediate_size, num_hidden_layers, vocab_size, text_model=True, position_ids=True,
                **_):
    """HF CLIPTextModel key -> shape under `cond_stage_model.transformer.` (older transformers: `text_model.`)."""
    p = "cond_stage_model.transformer." + ("text_model." if text_model else "")
    h, i = hidden_size, intermediate_size
    shapes = {f"{p}embeddings.token_embedding.weight": (vocab_size, h),
              f"{p}embeddings.position_embedding.weight": (77, h)}
    if position_ids:
        shapes[f"{p}embeddings.position_ids"] = (1, 77)
    for n in range(num_hidden_layers):
        layer = f"{p}encoder.layers.{n}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes |= {f"{layer}self_attn.{proj}.weight": (h, h), f"{layer}self_attn.{proj}.bias": (h,)}
        shapes |= {f"{layer}mlp.fc1.weight": (i, h), f"{layer}mlp.fc1.bias": (i,), f"{layer}mlp.fc2.weight": (h, i),
                   f"{layer}mlp.fc2.bias": (h,)}
        for ln in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{layer}{ln}.weight": (h,), f"{layer}{ln}.bias": (h,)}
    return shapes | {f"{p}final_layer_norm.weight": (h,), f"{p}final_layer_norm.bias": (h,)}


def bert_layout(n_embed: int, n_layer: int, vocab_size: int = 30522, max_seq_len: int = 77, **_) -> Layout:
    """BERTEmbedder: x_transformer.TransformerWrapper(Encoder(dim=n_embed, depth=n_layer)), 8 heads of 64; pre-norm
    layers alternate attention (`layers.2i`) and GELU feed-forward (`layers.2i+1`); `to_logits` is the LM head."""
    out: Layout = {}
    inner = 8 * 64
    out["token_emb.weight"], out["pos_emb.emb.weight"] = (vocab_size, n_embed), (max_seq_len, n_embed)
    for i in range(n_layer):
        a, f = f"attn_layers.layers.{2 * i}", f"attn_layers.layers.{2 * i + 1}"
        norm(out, f"{a}.0", n_embed)
        for name in ("to_q", "to_k", "to_v"):
            linear(out, f"{a}.1.{name}", n_embed, inner, bias=False)
        linear(out, f"{a}.1.to_out", inner, n_embed)
        norm(out, f"{f}.0", n_embed)
        linear(out, f"{f}.1.net.0.0", n_embed, 4 * n_embed), linear(out, f"{f}.1.net.2", 4 * n_embed, n_embed)
    norm(out, "norm", n_embed), linear(out, "to_logits", n_embed, vocab_size)
    return prefixed("transformer.", out)


def cond_stage_layout(config: Any, first_stage: Layout, clip: Mapping[str, int] | None) -> Layout:
    """`cond_stage_model.*` of a LatentDiffusion file: a second copy of the first stage for __is_first_stage__
    (CompVis saves the shared module under both names), nothing for __is_unconditional__ and torch.nn.Identity."""
    if config == "__is_first_stage__":
        return prefixed("cond_stage_model.", first_stage)
    if config == "__is_unconditional__" or config["target"] == "torch.nn.Identity":
        return {}
    name, params = config["target"].rsplit(".", 1)[-1], config.get("params") or {}
    out: Layout = {}
    if name == "ClassEmbedder":
        out["embedding.weight"] = (params.get("n_classes", 1000), params["embed_dim"])
    elif name == "BERTEmbedder":
        out = bert_layout(**params)
    elif name == "SpatialRescaler" and params.get("out_channels") is not None:
        conv(out, "channel_mapper", params.get("in_channels", 3), params["out_channels"], 1,
             bias=params.get("bias", False))
    elif name == "FrozenCLIPEmbedder":
        return clip_layout(**clip)
    elif name != "SpatialRescaler":
        raise ValueError(f"no layout rule for the conditioner {config['target']}")
    return prefixed("cond_stage_model.", out)


# ---- whole checkpoints -------------------------------------------------------------------------------------------
def checkpoint_layout(model: Mapping[str, Any], clip: Mapping[str, int] | None = None) -> Layout:
    """The published state dict of a `model` section: a first stage with its training loss, or a LatentDiffusion
    with U-Net, first stage, conditioner, schedule buffers (+ scale_factor with scale_by_std) and, unless
    use_ema is false, LitEma's copies (`model_ema.<U-Net key without dots>`, decay, num_updates)."""
    target, params = model["target"], model["params"]
    if not target.endswith("LatentDiffusion"):
        return first_stage_layout(model)
    unet = prefixed("model.diffusion_model.", unet_layout(params["unet_config"]["params"]))
    first = first_stage_layout(params["first_stage_config"])
    out = unet | prefixed("first_stage_model.", first)
    out |= cond_stage_layout(params.get("cond_stage_config"), first, clip)
    out |= {name: (params.get("timesteps", 1000),) for name in SCHEDULE_BUFFERS}
    if params.get("scale_by_std", False):
        out["scale_factor"] = ()
    if params.get("use_ema", True):
        out |= {"model_ema." + k[len("model."):].replace(".", ""): s for k, s in unet.items()}
        out |= {"model_ema.decay": (), "model_ema.num_updates": ()}
    return out


def make_tensor(key: str, shape: tuple, meta: bool, g: torch.Generator | None) -> torch.Tensor:
    """A tensor for a layout entry: on the meta device, or random (counters as ints, position ids as 0..L-1)."""
    if key.endswith("position_ids"):
        return torch.arange(77)[None]
    if key.endswith(("num_updates", "num_batches_tracked")):
        return torch.tensor(7)
    return torch.empty(shape, device="meta") if meta else torch.randn(shape, generator=g) * 0.1


def count(layout: Mapping[str, tuple], prefix: str = "") -> tuple[int, int]:
    """(keys, numbers) of the layout entries under `prefix`."""
    entries = [s for k, s in layout.items() if k.startswith(prefix)]
    return len(entries), sum(torch.Size(s).numel() for s in entries)


# ---- helpers -----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def parameters_on_meta():
    """New parameters live on the meta device (no memory); buffers stay real (the schedule is computed)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, None if param is None else nn.Parameter(param.to("meta"), param.requires_grad))

    with mock.patch.object(nn.Module, "register_parameter", on_meta):
        yield


def clip_folder(folder, weights, **config):
    """A local CLIP text model folder: a tiny byte-level BPE tokenizer (a-z), config.json (+ random weights)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    cfg = CLIPTextConfig(max_position_embeddings=77, bos_token_id=52, eos_token_id=53, pad_token_id=53, **config)
    (CLIPTextModel(cfg) if weights else cfg).save_pretrained(folder)
    return str(folder)
