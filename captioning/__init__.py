"""Dense captioning with LLaVA-family models on Ray."""
