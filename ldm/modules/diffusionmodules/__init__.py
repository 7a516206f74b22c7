"""The diffusion U-Net (CompVis / SD 1.x / SD 2.x key layout), its attention layers and timestep embedding."""
from ldm.modules.diffusionmodules.attention import (AttentionBlock, BasicTransformerBlock, CrossAttention,
                                                    FeedForward, SpatialTransformer)
from ldm.modules.diffusionmodules.embeddings import timestep_embedding
from ldm.modules.diffusionmodules.resblock import Modulation, ResBlock, apply_modulation
from ldm.modules.diffusionmodules.unet import TimestepEmbedSequential, UNetModel

__all__ = ["AttentionBlock", "BasicTransformerBlock", "CrossAttention", "FeedForward", "Modulation", "ResBlock",
           "SpatialTransformer", "TimestepEmbedSequential", "UNetModel", "apply_modulation", "timestep_embedding"]
