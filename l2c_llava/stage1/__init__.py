"""Stage 1: caption-contrastive fine-tuning of a decoder LLM into a caption encoder (LLM2Vec method)."""
