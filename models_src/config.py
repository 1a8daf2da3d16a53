"""The one configuration dataclass every architecture is built from.

A single flat dataclass (rather than one per architecture) keeps `config.json`
simple: fields an architecture does not use are ignored by it and still
round-trip, so a checkpoint's config is always `ModelConfig(**json)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

ARCHITECTURES = ("rnn", "gru", "lstm", "gpt", "seq2seq")
#: The GPT's MLP activation -> F.gelu's ``approximate``: the exact (erf) GELU, Fable's own,
#: or the tanh approximation that GPT-2 checkpoints were trained with ("gelu_new").
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}


@dataclass
class ModelConfig:
    arch: str = "gpt"
    vocab_size: int = 256
    n_layer: int = 2
    n_embd: int = 128  # embedding width (= d_model for attention models)
    # attention models
    n_head: int = 4
    block_size: int = 256  # longest context an attention model sees (learned positions)
    n_decoder_layer: int | None = None  # seq2seq: decoder depth (defaults to n_layer)
    # recurrent models
    n_hidden: int = 256
    # regularisation (AWD-LSTM names in comments)
    dropout: float = 0.0  # output dropout (awd: dropout); residual dropout for attention
    dropout_input: float = 0.0  # locked dropout on the embeddings (awd: dropouti)
    dropout_hidden: float = 0.0  # locked dropout between RNN layers (awd: dropouth)
    dropout_embedding: float = 0.0  # drops whole word vectors (awd: dropoute)
    weight_drop: float = 0.0  # DropConnect on hidden-to-hidden matrices (awd: wdrop)
    tie_weights: bool = True
    bias: bool = True
    activation: str = "gelu"  # GPT only: a key of ACTIVATIONS
    # special token ids the model itself needs (seq2seq splits source/target at sep_id)
    pad_id: int | None = None
    sep_id: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; expected one of {ARCHITECTURES}")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
        if self.arch in ("gpt", "seq2seq") and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.arch == "seq2seq" and self.sep_id is None:
            raise ValueError("seq2seq needs sep_id: the token that ends the source")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; "
                             f"expected one of {tuple(ACTIVATIONS)}")
        if self.activation != "gelu" and self.arch != "gpt":
            raise ValueError(f"activation {self.activation!r} is only implemented "
                             f"for the GPT")
        for name in ("dropout", "dropout_input", "dropout_hidden", "dropout_embedding", "weight_drop"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)
