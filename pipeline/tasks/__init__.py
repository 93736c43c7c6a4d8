"""Layer 5: what runs on trained models. Export, `alum eval`, fine-tuning, fill-mask, plots, the HF Trainer subclass,
the demo.

Imports go down the layers only (core -> data -> model -> methods -> train -> tasks ->
cli); tests/project/test_layers.py checks it."""
