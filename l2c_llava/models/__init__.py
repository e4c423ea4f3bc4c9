"""Model folders as every consumer reads them (transformers 4.37 / 4.44 / 5.x, the original LLaVA code)."""
