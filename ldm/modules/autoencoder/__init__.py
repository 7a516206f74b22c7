"""First-stage autoencoder networks (Encoder, Decoder) and their blocks, CompVis key layout."""
from ldm.modules.autoencoder.blocks import AttnBlock, Downsample, Normalize, ResnetBlock, Upsample
from ldm.modules.autoencoder.model import Decoder, Encoder

__all__ = ["AttnBlock", "Decoder", "Downsample", "Encoder", "Normalize", "ResnetBlock", "Upsample"]
