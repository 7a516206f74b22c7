"""StableSR's networks: the time-aware encoder, the SFT modulation layer, the base U-Net with one per ResBlock."""
from ldm.modules.stablesr.encoder import TimeAwareEncoder
from ldm.modules.stablesr.sft import FORMS, SFTLayer
from ldm.modules.stablesr.unet import SFT_KEY, SFTUNetModel

__all__ = ["FORMS", "SFTLayer", "SFTUNetModel", "SFT_KEY", "TimeAwareEncoder"]
