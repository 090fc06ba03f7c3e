"""The generation stage: FLUX dev and schnell loaded once, go_fast (fp8 + compile), denoising, safety, files.

It takes a validated request and transformers carrying their adapters, and hands on image files.
"""
