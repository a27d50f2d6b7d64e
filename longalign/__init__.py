"""LongAlign: long-prompt alignment for Stable Diffusion 1.5 (arXiv 2410.11817)."""
