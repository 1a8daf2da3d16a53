"""Fable's model library: tokenizers, architectures, sampling and checkpoints.

It imports neither Flask nor the training loop; `training/` and `app/` stand on it.
"""

from .base import IGNORE_INDEX, LanguageModel
from .config import ARCHITECTURES, ModelConfig
from .gpt import GPT
from .registry import build_model
from .rnn import RecurrentLM
from .seq2seq import Seq2SeqTransformer


__all__ = [
    "ARCHITECTURES", "GPT", "IGNORE_INDEX", "LanguageModel", "ModelConfig",
    "RecurrentLM", "Seq2SeqTransformer", "build_model",
]
