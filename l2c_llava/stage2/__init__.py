"""Stage 2: LLM2CLIP (frozen LLM caption features, CLIP vision fine-tuning)."""
