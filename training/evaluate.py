"""Evaluate a checkpoint: loss, perplexity, token accuracy, bits per character, samples.

    python -m training.evaluate --checkpoint runs/char-gpt-shakespeare/final
    python -m training.evaluate --checkpoint DIR --data held_out.txt --split all --stride 64

Scores a split of the checkpoint's own corpus (or of ``--data``), read as the model was
trained; ``--bleu N`` adds continuation BLEU and ``--task infill`` scores story middles.
Each evaluation appends an experiment row. What each figure means: docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import sacrebleu
import torch

from models_src.checkpoint import CheckpointError, load_checkpoint
from models_src.fast_decode import PRECISIONS
from models_src.generation import generate
from models_src.sampling import SamplingParams
from models_src.summary import count_parameters
from models_src.records import ExperimentLog

from .data import DataConfig, DataError, encode_documents, load_documents, read_all_documents
from .infill_eval import GIVEN, generated_middles, middle_scores, story_parts
from .lossy import dropped_bits
from .metrics import score, score_documents

DEFAULT_PROMPTS = ("", "Once upon a time", "The ")


def _trained_data(checkpoint) -> dict:
    """The ``data`` section of the config the checkpoint was trained with ({} if none)."""
    return checkpoint.training.config_section("data")


def documents_for(checkpoint, data_path: str | None, split: str) -> tuple[list[str], list[str]]:
    """The documents of ``split`` and of the training split beside it (none for ``train``
    and ``all``): from ``data_path``, or the checkpoint's training data."""
    trained_on = _trained_data(checkpoint)
    if data_path is None and not trained_on:
        raise DataError(f"{checkpoint.path} records no training data: pass --data")
    given = {"path": data_path, "corpus": None, "hub_name": None}  # --data replaces the recorded corpus
    config = DataConfig.from_dict({**trained_on, **given} if data_path else trained_on)
    if split == "all":  # every document of the file, unsplit
        return read_all_documents(config), []
    splits = load_documents(config)
    if split not in splits:
        raise DataError(f"{config.source} has no {split} split (it has {', '.join(splits)})")
    return splits[split], splits["train"] if split != "train" else []


def continuation_bleu(checkpoint, docs: list[str], count: int, max_tokens: int = 64) -> float:
    """BLEU of greedy continuations of each document's first half against its second half."""
    tok, hypotheses, references = checkpoint.tokenizer, [], []
    for doc in docs[:count]:
        ids = tok.encode(doc)[: 2 * max_tokens]
        if len(ids) < 4:
            continue
        half = len(ids) // 2
        params = SamplingParams(max_new_tokens=len(ids) - half, temperature=0)
        out = generate(checkpoint.model, tok, prompt_ids=[[tok.bos_id, *ids[:half]]], params=params)[0]
        hypotheses.append(out.text)
        references.append(tok.decode(ids[half:]))
    if not hypotheses:
        raise DataError("no document is long enough for --bleu")
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


def score_text(model, tok, docs: list[str], train_docs: list[str], seq_len: int, *,
               by_document: bool, batch_size: int = 16, stride: int | None = None,
               split: str = "validation") -> dict:
    """Loss, perplexity, accuracy and bits per character of ``docs``, read the way the model
    was trained to: one token stream, or (whole-example tasks) every document on its own
    from <bos>; either way every token and eos counts."""
    if by_document:
        documents = [np.array([tok.bos_id, *ids, tok.eos_id]) for ids in tok.encode_batch(docs)]
        if not documents:
            raise DataError(f"the {split} split has too little text to score")
        scores = score_documents(model, documents, seq_len, batch_size=batch_size, stride=stride)
    else:
        tokens = encode_documents(docs, tok)
        if len(tokens) < 2:
            raise DataError(f"the {split} split has too little text to score")
        scores = score(model, tokens, seq_len, batch_size=batch_size, stride=stride)
    characters = sum(map(len, docs))
    dropped = dropped_bits(tok, docs, primed_on=train_docs)
    return {
        "tokens": scores.tokens, "characters": characters, "loss": scores.loss,
        "perplexity": scores.perplexity, "token_accuracy": scores.accuracy,
        "bits_per_char": scores.bits_per_char(characters, sum(dropped.values())),
        "dropped_bits_per_char": {part: bits / characters for part, bits in dropped.items()},
        "vocab_size": tok.vocab_size, "seq_len": seq_len, "stride": stride or seq_len,
        "reads": "documents" if by_document else "stream",
    }


def evaluate_infill(checkpoint, docs: list[str], given: str, batch_size: int, bleu: int) -> dict:
    parts, without_middle = story_parts(docs)
    if not parts:
        raise DataError("no story in this split has a middle (three sentences or more)")
    max_len = checkpoint.model.max_context
    scores = middle_scores(checkpoint, parts, given, batch_size, max_len)
    result = {"task": "infill", "given": given, "stories": len(parts), "skipped": without_middle,
              "tokens": scores.tokens, "loss": scores.loss, "perplexity": scores.perplexity,
              "token_accuracy": scores.accuracy}
    if bleu:
        result.update(generated_middles(checkpoint, parts, bleu))
    return result


def evaluate(checkpoint_dir: str, data: str | None = None, split: str = "validation",
             stride: int | None = None, batch_size: int = 16, samples: int = 3, bleu: int = 0,
             experiments_dir: str | None = "experiments", device: str = "cpu",
             task: str = "lm", given: str = "first+last",
             decode_precision: str | None = None) -> dict:
    started = time.perf_counter()
    checkpoint = load_checkpoint(checkpoint_dir, device=device, decode_precision=decode_precision)
    docs, train_docs = documents_for(checkpoint, data, split)
    if task == "infill":
        result = evaluate_infill(checkpoint, docs, given, batch_size, bleu)
        result.update(checkpoint=str(checkpoint.path), split=split,
                      seconds=round(time.perf_counter() - started, 2))
        if experiments_dir:
            record(experiments_dir, checkpoint, result, kind=f"infill:{given}")
        return result
    seq_len = checkpoint.training.seq_len or checkpoint.config.block_size
    by_document = _trained_data(checkpoint).get("task", "lm") != "lm"
    result = {"checkpoint": str(checkpoint.path), "split": split,
              **score_text(checkpoint.model, checkpoint.tokenizer, docs, train_docs, seq_len,
                           by_document=by_document, batch_size=batch_size, stride=stride,
                           split=split)}
    precision = getattr(checkpoint.model, "decode_precision", "float32")
    if precision != "float32":
        result["decode_precision"] = precision
    if bleu:
        result["bleu"] = continuation_bleu(checkpoint, docs, bleu)
    if samples:
        params = SamplingParams(max_new_tokens=80, temperature=0.8, top_k=40, seed=0)
        outs = generate(checkpoint.model, checkpoint.tokenizer, list(DEFAULT_PROMPTS[:samples]), params)
        result["samples"] = [p + o.text for p, o in zip(DEFAULT_PROMPTS, outs)]
    result["seconds"] = round(time.perf_counter() - started, 2)
    if experiments_dir:
        record(experiments_dir, checkpoint, result, kind="evaluate")
    return result


def record(experiments_dir: str, checkpoint, result: dict, kind: str) -> None:
    """One experiment row for this evaluation."""
    trained = checkpoint.training
    name = trained.name or checkpoint.name  # the run's name, not "final"
    log = ExperimentLog(experiments_dir, name, config=trained.config)
    log.log(model=name, architecture=checkpoint.config.arch,
            parameters=count_parameters(checkpoint.model), step=trained.step or 0,
            epoch=float(trained.epoch or 0.0), val_loss=result["loss"],
            val_perplexity=result["perplexity"], token_accuracy=result["token_accuracy"],
            bits_per_char=result.get("bits_per_char"), bleu=result.get("bleu"),
            tokens_seen=trained.tokens_seen,
            wall_time_s=result["seconds"], split=result["split"], kind=kind)


def format_infill(result: dict) -> str:
    lines = [f"checkpoint      {result['checkpoint']}",
             f"stories         {result['stories']:,} in {result['split']} ({result['skipped']} without a middle)",
             f"middle given    {result['given']}",
             f"loss            {result['loss']:.4f} nats/token over {result['tokens']:,} middle tokens",
             f"perplexity      {result['perplexity']:.3f}",
             f"token accuracy  {result['token_accuracy']:.2%}"]
    if "bleu" in result:
        lines.append(f"BLEU            {result['bleu']:.2f} (length ratio {result['length_ratio']:.2f})")
        for ex in result["examples"]:
            lines.append("example         " + json.dumps(ex, ensure_ascii=False))
    return "\n".join(lines)


def _dropped(parts: dict[str, float]) -> str:
    if not any(parts.values()):
        return ""
    named = ", ".join(f"{part} {bits:.4f}" for part, bits in parts.items())
    return f" (of which the tokenizer drops {sum(parts.values()):.4f}: {named})"


def format_result(result: dict) -> str:
    if result.get("task") == "infill":
        return format_infill(result)
    lines = [f"checkpoint      {result['checkpoint']}",
             f"split           {result['split']} ({result['tokens']:,} tokens, {result['characters']:,} characters)",
             f"loss            {result['loss']:.4f} nats/token",
             f"perplexity      {result['perplexity']:.3f} (vocabulary {result['vocab_size']:,})",
             f"token accuracy  {result['token_accuracy']:.2%}",
             f"bits per char   {result['bits_per_char']:.4f}{_dropped(result['dropped_bits_per_char'])}",
             f"context         {result['seq_len']} tokens, stride {result['stride']}, "
             + ("each document on its own from <bos> (as trained)" if result["reads"] == "documents"
                else "the documents as one stream")]
    if "bleu" in result:
        lines.append(f"BLEU            {result['bleu']:.2f} (greedy continuations)")
    for sample in result.get("samples", []):
        lines.append("sample          " + json.dumps(sample, ensure_ascii=False))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--data", help="corpus to score (default: the checkpoint's training data)")
    parser.add_argument("--split", default="validation", choices=["train", "validation", "test", "all"])
    parser.add_argument("--stride", type=int, help="sliding-window stride for fixed-context models")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=3, help="sample generations to show (0-3)")
    parser.add_argument("--bleu", type=int, default=0, metavar="N", help="BLEU over N continuations")
    parser.add_argument("--experiments-dir", default="experiments", help="'' to record nothing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--task", default="lm", choices=["lm", "infill"],
                        help="infill: score story middles (training.infill_eval)")
    parser.add_argument("--given", default="first+last", choices=list(GIVEN),
                        help="infill: what the middle is conditioned on")
    parser.add_argument("--decode-precision", choices=PRECISIONS,
                        help="score a GPT through its inference path at this precision, as the "
                        "server would with this decode_precision (default: the checkpoint's own)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.checkpoint, args.data, args.split, args.stride, args.batch_size,
                          args.samples, args.bleu, args.experiments_dir or None, args.device,
                          args.task, args.given, args.decode_precision)
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
