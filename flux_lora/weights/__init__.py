"""The weights stage: where a LoRA (and the base-model store) comes from.

A reference is parsed into a typed source, downloaded safely into the shared on-disk cache, verified and
handed on as a local file path; nothing here imports torch or knows how the file is applied.
"""
