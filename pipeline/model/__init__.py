"""Layer 2: the model. The masked-LM view of an HF BERT/RoBERTa and the embedding perturbation hook.

Imports go down the layers only (core -> data -> model -> methods -> train -> tasks ->
cli); tests/project/test_layers.py checks it."""
