"""Fable's model library: tokenizers, architectures, sampling and checkpoints.

It imports neither Flask nor the training loop; `training/` and `app/` stand on it.
"""

from .base import IGNORE_INDEX, LanguageModel
from .config import ARCHITECTURES, ModelConfig
from .gpt import GPT
from .rnn import RecurrentLM
from .seq2seq import Seq2SeqTransformer


def build_model(config: ModelConfig) -> LanguageModel:
    """The model an architecture name stands for, freshly initialised."""
    if config.arch == "gpt":
        return GPT(config)
    if config.arch == "seq2seq":
        return Seq2SeqTransformer(config)
    return RecurrentLM(config)


__all__ = [
    "ARCHITECTURES", "GPT", "IGNORE_INDEX", "LanguageModel", "ModelConfig",
    "RecurrentLM", "Seq2SeqTransformer", "build_model",
]
