"""Conditioners tau_theta: raw condition -> (B, L, D) context for cross-attention, or a spatial map for concat.

Each has `forward(c)`/`encode(c)`; the token conditioners also have `null_condition(batch_size, device)`
(alias `unconditional(batch_size)`), the raw input meaning "no condition" for classifier-free guidance.
"""
from ldm.modules.encoders.class_embedder import ClassEmbedder
from ldm.modules.encoders.layout import LayoutEmbedder
from ldm.modules.encoders.openclip import FrozenOpenCLIPEmbedder
from ldm.modules.encoders.rescaler import SpatialRescaler
from ldm.modules.encoders.text import FrozenTextEmbedder, packaged_minilm_path
from ldm.modules.encoders.transformer_text import TransformerEncoder, TransformerTextEmbedder

__all__ = ["ClassEmbedder", "FrozenOpenCLIPEmbedder", "FrozenTextEmbedder", "LayoutEmbedder", "SpatialRescaler",
           "TransformerEncoder", "TransformerTextEmbedder", "packaged_minilm_path"]
