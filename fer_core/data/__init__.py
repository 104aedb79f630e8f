"""Data layer: SynthFACS generator, real-format adapters, canonical manifests, preprocessing."""
