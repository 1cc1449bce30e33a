"""lorastrap: a conda-based bootstrap for LoRA + 8-bit fine-tuning environments (`lorastrap` / `python -m lorastrap`)."""

__version__ = "0.2.0"
