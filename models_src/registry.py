"""Architecture name -> model class."""

from __future__ import annotations

from .base import LanguageModel
from .config import ModelConfig
from .gpt import GPT
from .rnn import RecurrentLM
from .seq2seq import Seq2SeqTransformer

MODEL_CLASSES = {"rnn": RecurrentLM, "gru": RecurrentLM, "lstm": RecurrentLM,
                 "gpt": GPT, "seq2seq": Seq2SeqTransformer}


def build_model(config: ModelConfig) -> LanguageModel:
    """The model an architecture name stands for, freshly initialised."""
    return MODEL_CLASSES[config.arch](config)
