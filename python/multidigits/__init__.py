"""MultiDigits example: data, MultiLeNet, ray-stacked PaLoRA training, hypervolume, plots (see docs/training.md)."""
