"""Layer 3: the training objectives. Standard MLM and every adversarial method (ALUM and its
siblings, SMART, ASA), and what they share.

Imports go down the layers only (core -> data -> model -> methods -> train -> tasks ->
cli); tests/project/test_layers.py checks it."""
