"""PixArt-α training: features, data, diffusion, models and the training loop."""
