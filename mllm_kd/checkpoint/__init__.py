"""Checkpoints: the native self-describing directory (:mod:`.native`) and the Hugging Face LLaVA layout (:mod:`.hf_llava`)."""
