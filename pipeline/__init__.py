"""Pretraining: configuration, data loading and masking, the ALUM objective, training, export."""
