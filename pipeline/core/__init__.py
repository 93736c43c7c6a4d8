"""Layer 0, used by every other: value checks, RNG state, YAML mappings, help formatting.

Imports go down the layers only (core -> data -> model -> methods -> train -> tasks ->
cli); tests/project/test_layers.py checks it."""
