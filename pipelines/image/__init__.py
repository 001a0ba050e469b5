"""Stable Diffusion LoRA: config.py (settings), data.py (images and captions), model.py (base pipelines and
the tiny preset), pipeline.py (train, generate, export)."""
