"""Key -> shape layouts of the published Stable Diffusion 2.x and StableSR checkpoints, from the layout rules
(REFERENCE.md §2, /work/shared/STABLESR.md §a, §b, §n): written independently of the model code, so that loading
them strictly checks our module names and shapes. Full-size counts are pinned to StableSR's manifest in the tests.
"""
from tests.test_compat import autoencoder_layout


def _wb(shapes, prefix, weight, bias):
    shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = tuple(weight), (bias,)


def _norm(shapes, prefix, c):
    _wb(shapes, prefix, (c,), c)


def resblock(shapes, p, c_in, c_out, emb):
    _norm(shapes, f"{p}.in_layers.0", c_in), _wb(shapes, f"{p}.in_layers.2", (c_out, c_in, 3, 3), c_out)
    _wb(shapes, f"{p}.emb_layers.1", (c_out, emb), c_out)
    _norm(shapes, f"{p}.out_layers.0", c_out), _wb(shapes, f"{p}.out_layers.3", (c_out, c_out, 3, 3), c_out)
    if c_in != c_out:
        _wb(shapes, f"{p}.skip_connection", (c_out, c_in, 1, 1), c_out)


def transformer(shapes, p, c, context):
    """SD 2.x SpatialTransformer: Linear proj_in / proj_out, depth 1, heads of 64 channels (inner = c)."""
    _norm(shapes, f"{p}.norm", c), _wb(shapes, f"{p}.proj_in", (c, c), c), _wb(shapes, f"{p}.proj_out", (c, c), c)
    b = f"{p}.transformer_blocks.0"
    for attn, kv in (("attn1", c), ("attn2", context)):
        shapes[f"{b}.{attn}.to_q.weight"] = (c, c)
        shapes[f"{b}.{attn}.to_k.weight"] = shapes[f"{b}.{attn}.to_v.weight"] = (c, kv)
        _wb(shapes, f"{b}.{attn}.to_out.0", (c, c), c)
    _wb(shapes, f"{b}.ff.net.0.proj", (8 * c, c), 8 * c), _wb(shapes, f"{b}.ff.net.2", (c, 4 * c), c)
    for n in ("norm1", "norm2", "norm3"):
        _norm(shapes, f"{b}.{n}", c)


def unet_layout(mc=320, mult=(1, 2, 4, 4), nrb=2, attn=(4, 2, 1), context=1024, c_in=4, c_out=4):
    """SD 2.x U-Net (`model.diffusion_model.` stripped); returns (shapes, {resblock name: out channels})."""
    s, res, emb = {}, {}, 4 * mc
    _wb(s, "time_embed.0", (emb, mc), emb), _wb(s, "time_embed.2", (emb, emb), emb)
    _wb(s, "input_blocks.0.0", (mc, c_in, 3, 3), mc)
    skips, ch, ds, n = [mc], mc, 1, 1

    def res_at(name, a, b):
        resblock(s, name, a, b, emb)
        res[name] = b

    for level, m in enumerate(mult):
        for _ in range(nrb):
            res_at(f"input_blocks.{n}.0", ch, m * mc)
            ch = m * mc
            if ds in attn:
                transformer(s, f"input_blocks.{n}.1", ch, context)
            skips.append(ch)
            n += 1
        if level < len(mult) - 1:
            _wb(s, f"input_blocks.{n}.0.op", (ch, ch, 3, 3), ch)
            skips.append(ch)
            n, ds = n + 1, ds * 2
    res_at("middle_block.0", ch, ch), transformer(s, "middle_block.1", ch, context), res_at("middle_block.2", ch, ch)
    n = 0
    for level in reversed(range(len(mult))):
        for i in range(nrb + 1):
            c_skip, new = skips.pop(), mult[level] * mc
            res_at(f"output_blocks.{n}.0", ch + c_skip, new)
            ch = new
            if ds in attn:
                transformer(s, f"output_blocks.{n}.1", ch, context)
            if level > 0 and i == nrb:
                _wb(s, f"output_blocks.{n}.{2 if ds in attn else 1}.conv", (ch, ch, 3, 3), ch)
                ds //= 2
            n += 1
    _norm(s, "out.0", mc), _wb(s, "out.2", (c_out, mc, 3, 3), c_out)
    return s, res


def spade_layout(resblocks, semb=256, hidden=128, norm=True):
    """StableSR's SPADE per ResBlock: `<block>.spade.{param_free_norm, mlp_shared.0, mlp_gamma, mlp_beta}`."""
    s = {}
    for name, c in resblocks.items():
        p = f"{name}.spade"
        if norm:
            _norm(s, f"{p}.param_free_norm", c)
        _wb(s, f"{p}.mlp_shared.0", (hidden, semb, 3, 3), hidden)
        _wb(s, f"{p}.mlp_gamma", (c, hidden, 3, 3), c), _wb(s, f"{p}.mlp_beta", (c, hidden, 3, 3), c)
    return s


def encoder_layout(mc=256, mult=(1, 1, 2, 2), nrb=2, attn=(4, 2, 1), out=256, c_in=4):
    """StableSR's time-aware encoder (`structcond_stage_model.` stripped): legacy AttentionBlocks (Conv1d qkv)."""
    s, emb = {}, 4 * mc

    def attention(p, c):
        _norm(s, f"{p}.norm", c), _wb(s, f"{p}.qkv", (3 * c, c, 1), 3 * c), _wb(s, f"{p}.proj_out", (c, c, 1), c)

    _wb(s, "time_embed.0", (emb, mc), emb), _wb(s, "time_embed.2", (emb, emb), emb)
    _wb(s, "input_blocks.0.0", (mc, c_in, 3, 3), mc)
    ch, ds, n, taps = mc, 1, 1, []
    for level, m in enumerate(mult):
        for _ in range(nrb):
            resblock(s, f"input_blocks.{n}.0", ch, m * mc, emb)
            ch = m * mc
            if ds in attn:
                attention(f"input_blocks.{n}.1", ch)
            n += 1
        if level < len(mult) - 1:
            taps.append(ch)
            _wb(s, f"input_blocks.{n}.0.op", (ch, ch, 3, 3), ch)
            n, ds = n + 1, ds * 2
    resblock(s, "middle_block.0", ch, ch, emb), attention("middle_block.1", ch)
    resblock(s, "middle_block.2", ch, ch, emb)
    for i, c in enumerate(taps + [ch]):
        resblock(s, f"fea_tran.{i}", c, out, emb)
    return s


def openclip_layout(width=1024, layers=24, vocab=49408, context=77, embed=1024):
    """OpenCLIP text tower as SD 2.x stores it (`cond_stage_model.model.` stripped)."""
    s = {"positional_embedding": (context, width), "text_projection": (width, embed), "logit_scale": (),
         "token_embedding.weight": (vocab, width)}
    _norm(s, "ln_final", width)
    for i in range(layers):
        p = f"transformer.resblocks.{i}"
        _norm(s, f"{p}.ln_1", width), _norm(s, f"{p}.ln_2", width)
        s[f"{p}.attn.in_proj_weight"], s[f"{p}.attn.in_proj_bias"] = (3 * width, width), (3 * width,)
        _wb(s, f"{p}.attn.out_proj", (width, width), width)
        _wb(s, f"{p}.mlp.c_fc", (4 * width, width), 4 * width), _wb(s, f"{p}.mlp.c_proj", (width, 4 * width), width)
    return s


def prefixed(prefix, shapes):
    return {prefix + k: v for k, v in shapes.items()}


def sd2_layout(unet=None, vae=None, clip=None):
    """Full SD 2.x LatentDiffusion layout (the 12 schedule buffers excluded)."""
    unet_shapes, _ = unet_layout(**(unet or {}))
    vae = vae or dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4, embed_dim=4)
    return (prefixed("model.diffusion_model.", unet_shapes) | prefixed("first_stage_model.", autoencoder_layout(**vae))
            | prefixed("cond_stage_model.model.", openclip_layout(**(clip or {}))))


def stablesr_layout(unet=None, vae=None, clip=None, encoder=None, semb=256, hidden=128):
    """SD 2.x layout + SPADE in every U-Net ResBlock + the time-aware encoder."""
    _, resblocks = unet_layout(**(unet or {}))
    return (sd2_layout(unet, vae, clip) | prefixed("model.diffusion_model.", spade_layout(resblocks, semb, hidden))
            | prefixed("structcond_stage_model.", encoder_layout(**(encoder or {}))))
