"""The multimodal LM: vision towers, projector, LLM, their assembly, tokenization and generation."""
