"""Layer 1: what a step reads. Shard datasets and batches, sample order, masking, the mask-rate curriculum, GLUE task
files.

Imports go down the layers only (core -> data -> model -> methods -> train -> tasks ->
cli); tests/project/test_layers.py checks it."""
