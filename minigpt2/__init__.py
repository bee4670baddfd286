"""minigpt2: GPT-2 (Radford et al., 2019) rebuilt from scratch with NumPy/CuPy.

Hand-written forward and backward passes for every layer, checked against finite differences
and against transformers/PyTorch. Start with ``GPTConfig``, ``GPT`` and ``AdamW``.
"""

from .config import GPTConfig
from .model import GPT
from .fast.optim import AdamW   # optim.AdamW's update in fewer passes (see fast/optim.py)
from .optim import clip_grad_norm
from .tokenizer import Tokenizer

__all__ = ["GPT", "GPTConfig", "AdamW", "clip_grad_norm", "Tokenizer"]
__version__ = "0.1.0"
