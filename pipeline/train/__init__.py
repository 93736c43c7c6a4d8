"""Layer 4: pretraining. Config, entry point and loop, the step, DeepSpeed set-up, distributed plumbing, checkpoints
and resume, metrics, validation, stopping and supervising.

Imports go down the layers only (core -> data -> model -> methods -> train -> tasks ->
cli); tests/project/test_layers.py checks it."""
