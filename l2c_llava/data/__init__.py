"""Data: the embedded synthetic dataset and readers for the real formats."""
