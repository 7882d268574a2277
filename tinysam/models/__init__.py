"""Model architectures (TinyViT students, SAM teachers) and checkpoint I/O."""
