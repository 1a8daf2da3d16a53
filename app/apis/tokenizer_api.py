"""vLLM's tokenizer routes, which evaluation harnesses look for beside ``/v1``:
``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info``. Each names its model
(``model`` in the body, or in the query for ``/tokenizer_info``); a server with one model
loaded also answers without it, as vLLM, which serves one, does (lm-evaluation-harness
sends none). Answers are the models of app/apis/responses.py; errors are OpenAI's shape,
as vLLM's are.
"""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from app.apis.responses import Detokenized, Tokenized, TokenizerInfo, wire
from app.platform.ratelimit import rate_limited
from app.platform.settings import get_settings
from app.platform.web import openai_error
from app.serving.bodies import read_json_object
from app.serving.registry import LoadedModel, get_registry
from app.serving.schema import RequestError
from app.serving.service import ServiceError
from models_src.sampling import encode_prompt

bp = Blueprint("tokenizer_api", __name__)


@bp.errorhandler(RequestError)
def _request_error(e: RequestError):
    return openai_error(e.status, e.message, param=e.field,
                        code="unsupported_media_type" if e.status == 415 else None)


@bp.errorhandler(ServiceError)
def _service_error(e: ServiceError):
    return openai_error(e.status, e.message, param=e.param)


def _model(name: object) -> LoadedModel:
    """The model named, or the only one loaded when none is named."""
    registry = get_registry()
    if name is None:
        facts = registry.facts()
        if len(facts) != 1:
            raise RequestError("model", f"'model' is required: this server has {len(facts)} models "
                                        f"({', '.join(f.name for f in facts)})")
        name = facts[0].name
    if not isinstance(name, str) or not name:
        raise RequestError("model", "'model' must be the name of a loaded model")
    loaded = registry.get(name)
    if loaded is None:
        raise _NotFound(name)
    return loaded


class _NotFound(ServiceError):
    status, param = 404, "model"

    def __init__(self, name: str) -> None:
        super().__init__(f"The model {name[:100]!r} does not exist")


def _flag(body: dict, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(key, f"'{key}' must be true or false")
    return value


@bp.post("/tokenize")
@rate_limited
def tokenize():
    """The prompt's token ids; ``add_special_tokens`` (default true) puts a bos first where
    the model's tokenizer adds one, as generation does."""
    body = read_json_object(request)
    loaded = _model(body.get("model"))
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError("prompt", "'prompt' must be a string")
    limit = get_settings().limits.max_prompt_chars
    if len(prompt) > limit:
        raise RequestError("prompt", f"'prompt' is {len(prompt)} characters long; the limit is {limit}")
    tokenizer = loaded.tokenizer
    ids = encode_prompt(tokenizer, prompt) if _flag(body, "add_special_tokens", True) else tokenizer.encode(prompt)
    strings = [tokenizer.decode([i], skip_special_tokens=False) for i in ids] \
        if _flag(body, "return_token_strs", False) else None
    return jsonify(wire(Tokenized(count=len(ids), max_model_len=loaded.model.max_context, tokens=ids,
                                  token_strs=strings)))


@bp.post("/detokenize")
@rate_limited
def detokenize():
    """The text of token ids (special tokens show as nothing, as in generated text)."""
    body = read_json_object(request)
    loaded = _model(body.get("model"))
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise RequestError("tokens", "'tokens' must be a list of token ids")
    limit = get_settings().limits.max_prompt_chars
    if len(ids) > limit:
        raise RequestError("tokens", f"'tokens' holds {len(ids)} ids; the limit is {limit}")
    vocab = loaded.tokenizer.vocab_size
    outside = [i for i in ids if not 0 <= i < vocab]
    if outside:
        raise RequestError("tokens", f"'tokens' holds the id {outside[0]}, which is not in model "
                                     f"{loaded.name!r}'s vocabulary (ids 0 to {vocab - 1})")
    return jsonify(wire(Detokenized(prompt=loaded.tokenizer.decode(ids))))


@bp.get("/tokenizer_info")
def tokenizer_info():
    """The tokenizer's special tokens, context and chat template, as vLLM lists them."""
    loaded = _model(request.args.get("model"))
    tokenizer, special = loaded.tokenizer, loaded.tokenizer.special_tokens
    return jsonify(wire(TokenizerInfo(
        model=loaded.name, tokenizer_class="PreTrainedTokenizerFast", kind=tokenizer.kind,
        vocab_size=tokenizer.vocab_size, bos_token=special.get("bos"), eos_token=special.get("eos"),
        pad_token=special.get("pad"), unk_token=special.get("unk"), add_bos_token=tokenizer.adds_bos,
        model_max_length=loaded.model.max_context, chat_template=getattr(tokenizer, "chat_template", None))))
