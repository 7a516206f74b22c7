"""Round-trip figures of the ldm <-> diffusers conversion on tiny random models (CPU, fp32; needs diffusers).

    python scripts/convert_roundtrip_report.py

For each diffusers model type: build it with random weights, convert it to ours, run both on the same inputs
and print the max abs difference of the outputs; convert ours back and say whether the state dict is bit-exact.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ldm.convert import components as comp  # noqa: E402
from ldm.convert.text_encoder import published_naming  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

BLOCKS = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
              down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
              up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"))


def randomized(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def exact(a, b):
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


def diff(a, b):
    return (a - b).abs().max().item()


def unets(diffusers):
    cond = randomized(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        attention_head_dim=2, cross_attention_dim=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    plain = randomized(diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(32, 64),
        attention_head_dim=16, num_class_embeds=5, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D")))
    t, y = torch.tensor([3, 700]), torch.tensor([1, 4])
    x4, x3, context = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 5, 16)
    for theirs, run_theirs, run_ours in (
            (cond, lambda m: m(x4, t, encoder_hidden_states=context).sample, lambda m: m(x4, t, context=context)),
            (plain, lambda m: m(x3, t, class_labels=y).sample, lambda m: m(x3, t, y=y))):
        params, sd = comp.unet_from_component({"_class_name": type(theirs).__name__, **theirs.config},
                                              theirs.state_dict(), "unet")
        ours = instantiate_from_config({"target": comp.UNET_TARGET, "params": params}).eval()
        ours.load_state_dict(sd)
        back = comp.unet_to_component(params, ours.state_dict(), "ours").state_dict
        yield type(theirs).__name__, "noise prediction", diff(run_ours(ours), run_theirs(theirs)), \
            exact(back, theirs.state_dict())


def autoencoders(diffusers):
    x = torch.randn(2, 3, 16, 16)
    for theirs in (randomized(diffusers.AutoencoderKL(latent_channels=4, **BLOCKS)),
                   randomized(diffusers.VQModel(latent_channels=3, vq_embed_dim=4, num_vq_embeddings=16, **BLOCKS))):
        target, params, sd, scaling = comp.first_stage_from_component(
            {"_class_name": type(theirs).__name__, **theirs.config}, theirs.state_dict(), "vae")
        ours = instantiate_from_config({"target": target, "params": params}).eval()
        ours.load_state_dict(sd)
        back = comp.first_stage_to_component(target, params, ours.state_dict(), scaling, "ours").state_dict
        if target == comp.KL_TARGET:
            h_theirs, h_ours = theirs.encode(x).latent_dist.mean, ours.encode(x).mean
            dec = diff(ours.decode(h_theirs), theirs.decode(h_theirs).sample)
        else:
            h_theirs, h_ours = theirs.encode(x).latents, ours.encode(x, return_pre_quant=True)
            dec = diff(ours.decode(ours.quantize(h_theirs)[0]), theirs.decode(h_theirs).sample)
        yield type(theirs).__name__, "encode", diff(h_ours, h_theirs), exact(back, theirs.state_dict())
        yield type(theirs).__name__, "decode", dec, exact(back, theirs.state_dict())


def text_encoder():
    """CLIP weights in the published naming (a pipeline's text_encoder/) loaded by our FrozenTextEmbedder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.modules.encoders.text import FrozenTextEmbedder

    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=30522, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    theirs = randomized(CLIPTextModel(config))
    ours = FrozenTextEmbedder(config, model_class="clip", pretrained=False)
    ours.load_state_dict({f"transformer.{k}": v for k, v in published_naming(theirs.state_dict()).items()})
    ids = torch.randint(0, 30522, (2, 77))
    back = published_naming(ours.transformer.state_dict())
    yield "CLIPTextModel", "last_hidden_state", diff(ours.transformer(ids).last_hidden_state,
                                                     theirs(ids).last_hidden_state), \
        exact(back, published_naming(theirs.state_dict()))


def main() -> int:
    try:
        import diffusers
    except ImportError:
        print("convert_roundtrip_report.py: needs diffusers (pip install -e '.[test]')", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, CPU float32, tiny random models")
    print(f"{'model':22s} {'output':18s} {'max abs diff':>12s}  back to diffusers")
    with torch.no_grad():
        for name, output, value, back in [*unets(diffusers), *autoencoders(diffusers), *text_encoder()]:
            print(f"{name:22s} {output:18s} {value:12.2e}  {'bit-exact' if back else 'DIFFERS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
