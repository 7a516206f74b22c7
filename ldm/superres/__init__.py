"""StableSR pieces that are not networks: colour correction (colorfix) and tiled processing (tiling)."""
