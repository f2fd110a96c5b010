"""post-train: an MLOps pipeline for LLM post-training."""
