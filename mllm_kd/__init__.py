"""mllm-kd: distil a large multimodal LLM into a small one, the LLaVA-KD way (DPT -> SFT -> DFT)."""

__version__ = "0.1.0"
