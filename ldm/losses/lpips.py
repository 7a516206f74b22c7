"""Frozen LPIPS perceptual distance (Zhang et al. 2018) from the `lpips` package, CompVis key layout."""
import os
import urllib.parse
import warnings

import lpips
import torch
import torch.nn as nn
from torchvision import models as tv_models

# The ImageNet weights the `lpips` package asks torchvision for (its trunks call `tv.<net>(pretrained=True)`).
_TRUNK_WEIGHTS = {
    "vgg": tv_models.VGG16_Weights.IMAGENET1K_V1,
    "alex": tv_models.AlexNet_Weights.IMAGENET1K_V1,
    "squeeze": tv_models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
}


def _missing_trunk_error(net: str, err: Exception) -> RuntimeError:
    url = _TRUNK_WEIGHTS[net].url
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    return RuntimeError(
        f"LPIPS: could not obtain the pretrained torchvision {net} trunk weights ({type(err).__name__}: {err}). "
        f"Download {url} and place it as {os.path.join(folder, filename)} "
        f"(folder = torch.hub.get_dir()/checkpoints; set TORCH_HOME to move it), "
        f"or set `lpips_pretrained_backbone: false` in the loss config params to use a randomly initialised "
        f"trunk (then LPIPS is no longer a perceptual metric; for tests and offline smoke runs only).")


def build_lpips(pretrained_backbone: bool = True, net: str = "vgg") -> nn.Module:
    """The `lpips` package's LPIPS module, frozen (eval, no grad); inputs in [-1, 1], output (B, 1, 1, 1).

    pretrained_backbone=False uses a random trunk (`pnet_rand=True`); the calibrated linear layers
    always load from the package's install folder, so nothing is downloaded then. The package keeps
    its linear layers twice (`lin0..4` and a `lins` ModuleList); `lins` is turned into a plain list
    so the state dict is exactly the CompVis/taming one: scaling_layer.{shift,scale},
    net.slice1..5.N.{weight,bias}, lin0..4.model.1.weight.
    """
    if net not in _TRUNK_WEIGHTS:
        raise ValueError(f"build_lpips: net must be one of {sorted(_TRUNK_WEIGHTS)}, got {net!r}")
    with warnings.catch_warnings():  # torchvision's deprecation notice for lpips' `pretrained=` argument
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        try:
            model = lpips.LPIPS(net=net, pnet_rand=not pretrained_backbone, verbose=False)
        except OSError as err:  # URLError / socket errors: no network and no cached file
            raise _missing_trunk_error(net, err) from err
    linear_layers = list(model.lins)
    del model.lins
    model.lins = linear_layers  # plain list: still used by lpips' forward, no duplicate state-dict keys
    model.eval()
    model.requires_grad_(False)
    return model
