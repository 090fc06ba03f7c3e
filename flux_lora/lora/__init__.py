"""The LoRA stage: what a LoRA file is and how it runs on the loaded models.

A local file's format is detected and converted onto the model's module names, then applied as adapters
(reserved and copied in on compiled transformers); it hands on transformers that run exactly those LoRAs.
"""
