"""lorastrap: a conda-based bootstrap for LoRA + 8-bit fine-tuning environments.

Run from the checkout as ``python -m installer``.  (This import name is also pypa's ``installer``
distribution, which conda-lock depends on: never package this project as a distribution of that name.)
"""

__version__ = "0.1.0"
