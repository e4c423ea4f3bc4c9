"""LLaVA-1.5 with a swapped-in vision encoder: assembly, data, training, export."""
