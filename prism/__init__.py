"""prism: post-training for vision-language models (SFT -> ALIGN -> RLVR)."""

__version__ = "0.1.0"
