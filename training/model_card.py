"""Model cards: evaluate a checkpoint and write its README.md in the Hugging Face layout.

    python -m training.model_card --checkpoint checkpoints/tinystories-gpt

The evaluation (``training.evaluate`` on the validation split) is stored in the
checkpoint's ``config.json`` under ``evaluation``, and the card's figures are those
numbers, so the two never disagree (``tests/test_bundled.py`` checks it). The card
also gives the data and its licence, the training command and config, the hardware and
time, intended use and limits, and three samples at the model's own sampling defaults
(its generation_config.json; seeds 1-3), each as long as the model writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import date
from pathlib import Path

import yaml

from models_src.checkpoint import CARD_FILE, load_checkpoint
from models_src.generation import generate
from models_src.infill import trained_to_infill
from models_src.records import Evaluation, TrainingSummary
from models_src.sampling import encode_prompt

from .evaluate import evaluate

SAMPLE_SEEDS = (1, 2, 3)
SAMPLE_TOKENS = 200  # the longest sample, where the model's context does not end it first


# What each corpus is, where it comes from, and its licence; keyed by a part of its path.
CORPORA = {
    "tinystories": dict(
        name="TinyStories", hub="roneneldan/TinyStories", license="cdla-sharing-1.0",
        prompt="Once upon a time",
        about="short stories in simple English written by GPT-3.5 and GPT-4 (Eldan & Li, 2023, "
              "\"TinyStories: How Small Can Language Models Be and Still Speak Coherent English?\"); "
              "Fable's slice holds 7,505 training and 400 validation stories",
        data_licence="CDLA-Sharing-1.0"),
    "tinyshakespeare": dict(
        name="Tiny Shakespeare", hub="karpathy/tiny_shakespeare", license="mit", prompt="ROMEO:",
        about="40,000 lines of Shakespeare's plays, the char-rnn benchmark corpus (first 90 % "
              "train, last 10 % validation)",
        data_licence="public domain"),
    "books": dict(
        name="Project Gutenberg novels", hub=None, license="mit", prompt="Holmes",
        about="The Adventures of Sherlock Holmes and excerpts of The Wonderful Wizard of Oz, "
              "Alice in Wonderland and The Count of Monte Cristo (Project Gutenberg)",
        data_licence="public domain"),
    "wikitext": dict(
        name="WikiText-2", hub="Salesforce/wikitext", license="cc-by-sa-3.0", prompt="The",
        about="Wikipedia's good and featured articles (Merity et al., 2016)",
        data_licence="CC BY-SA 3.0"),
}


def _data_path(summary: TrainingSummary) -> str:
    """The corpus a run read, as corpus_of takes it ("" when the summary gives no path)."""
    return summary.data if isinstance(summary.data, str) else ""


def corpus_of(data_path: str) -> dict:
    for key, corpus in CORPORA.items():
        if key in data_path.replace("-", "").replace("_", "").lower():
            return corpus
    return dict(name=data_path, hub=None, license="other", prompt=own_prompt(data_path),
                about=data_path, data_licence="see the data's own terms")


def own_prompt(data_path: str, words: int = 3) -> str:
    """The prompt a model of someone's own text offers (its card's samples, the pages'
    placeholder): the first words of the text's first line, which read as that text does;
    "The" when the file cannot be read or holds no words."""
    try:
        with open(data_path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return "The"
    for line in head.splitlines():
        if line.split():
            return " ".join(line.split()[:words])[:40]
    return "The"


def write_json_atomically(path: Path, value: dict) -> None:
    """Write beside ``path`` and rename over it: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp's file is private; the checkpoint's files are not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def evaluation_record(checkpoint_dir: Path, batch_size: int = 16) -> Evaluation:
    """Evaluate on the validation split; the figures as stored in config.json."""
    result = evaluate(str(checkpoint_dir), split="validation", batch_size=batch_size, samples=0,
                      experiments_dir=None)
    return Evaluation(
        split="validation", tokens=result["tokens"], characters=result["characters"],
        loss=round(result["loss"], 4), perplexity=round(result["perplexity"], 3),
        bits_per_char=round(result["bits_per_char"], 4),
        token_accuracy=round(result["token_accuracy"], 4), reads=result["reads"],
        command=f"python -m training.evaluate --checkpoint {checkpoint_dir}",
        date=date.today().isoformat(),
    )


#: What a card states of its evaluation: a card is not written without all of them.
CARD_FIGURES = ("tokens", "characters", "loss", "perplexity", "bits_per_char", "token_accuracy",
                "command", "date")


def card_evaluation(config: dict) -> Evaluation:
    """config.json's evaluation; a ValueError names the first figure the card states that
    it lacks (or holds as something other than a figure)."""
    evaluation = Evaluation.from_dict(config.get("evaluation"))
    missing = [name for name in CARD_FIGURES if getattr(evaluation, name) is None]
    if missing:
        raise ValueError(f"the evaluation in config.json has no {missing[0]} "
                         f"(evaluate again: leave out --no-evaluate)")
    return evaluation


def samples(checkpoint, prompt: str) -> list[str]:
    """Three texts as a request with only a prompt gets them: the model's own settings, to
    the end of its context."""
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    prompt_tokens = len(encode_prompt(tokenizer, prompt))
    out = []
    for seed in SAMPLE_SEEDS:
        params = checkpoint.defaults.params({"seed": seed}, prompt_tokens=prompt_tokens,
                                            context=model.max_context, cap=SAMPLE_TOKENS)
        out.append(prompt + generate(model, tokenizer, prompt, params)[0].text)
    return out


def front_matter(name: str, config: dict, ev: Evaluation, corpus: dict) -> dict:
    arch, vocab = config["model"]["arch"], config["model"]["vocab_size"]
    metrics = [
        {"type": "bits_per_character", "value": ev.bits_per_char, "name": "Bits per character"},
        {"type": "perplexity", "value": ev.perplexity, "name": f"Perplexity ({vocab:,}-token vocabulary)"},
        {"type": "loss", "value": ev.loss, "name": "Cross-entropy (nats per token)"},
        {"type": "accuracy", "value": ev.token_accuracy, "name": "Next-token accuracy"},
    ]
    dataset = {"type": corpus["hub"] or corpus["name"], "name": corpus["name"], "split": "validation"}
    meta = {
        "license": corpus["license"], "language": ["en"], "library_name": "fable",
        "pipeline_tag": "text-generation",
        "widget": [{"text": corpus["prompt"]}],  # the app's placeholder prompt, as on the hub
        "tags": ["text-generation", "small-language-model", arch, config["tokenizer"]["kind"]],
        "model-index": [{"name": name, "results": [{
            "task": {"type": "text-generation", "name": "Language modelling"},
            "dataset": dataset, "metrics": metrics}]}],
    }
    if corpus["hub"]:
        meta["datasets"] = [corpus["hub"]]
    return meta


def describe(config: dict) -> str:
    m = config["model"]
    if m["arch"] == "gpt":
        shape = f"{m['n_layer']} layers, {m['n_head']} heads, {m['n_embd']} wide, {m['block_size']}-token context"
    elif m["arch"] == "seq2seq":
        shape = f"{m['n_layer']} encoder layers, {m['n_embd']} wide, {m['block_size']}-token context"
    else:
        shape = f"{m['n_layer']} layers, {m['n_embd']}-wide embeddings, {m['n_hidden']} hidden units"
    kind = {"gpt": "GPT-style decoder", "lstm": "LSTM", "gru": "GRU", "rnn": "RNN",
            "seq2seq": "encoder-decoder Transformer"}[m["arch"]]
    return f"a {kind} ({shape}) with a {config['tokenizer']['kind']} tokenizer of {m['vocab_size']:,} tokens"


def render(name: str, config: dict, sample_texts: list[str], infills: bool,
           sampling: str = "temperature 1") -> str:
    """The card; ``sampling``: how the samples were drawn, in words (SamplingDefaults.described)."""
    t, ev = TrainingSummary.from_dict(config.get("training")), card_evaluation(config)
    corpus = corpus_of(_data_path(t))
    run = t.config or {}
    hours, minutes = divmod(round((t.training_time_s or 0) / 60), 60)
    duration = f"{hours} h {minutes} min" if hours else f"{minutes} min"
    command = t.command or (
        f"python -m training.train --config training/configs/{run.get('name', name).replace('-', '_')}.yaml")
    lines = [
        "---", yaml.safe_dump(front_matter(name, config, ev, corpus), sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        f"{describe(config)[0].upper()}{describe(config)[1:]}, {config['parameters']:,} parameters, "
        f"trained with Fable on {corpus['name']}.", "",
        "## Data", "",
        f"{corpus['name']}: {corpus['about']}. Licence of the data: {corpus['data_licence']}.", "",
        "## Training", "",
        "```",
        command,
        "```", "",
        f"- Hardware: {t.hardware}; training time {duration} ({t.training_time_s} s).",
        f"- {t.step or 0:,} optimizer steps, {t.tokens_seen or 0:,} tokens seen "
        f"({t.epoch or 0:.2f} epochs).",
        "- The whole configuration it ran with:", "",
        "```yaml", yaml.safe_dump(run, sort_keys=False).strip(), "```", "",
        "## Evaluation", "",
        f"On the validation split ({ev.characters:,} characters, {ev.tokens:,} tokens), "
        f"with `{ev.command}` on {ev.date}:", "",
        "| metric | value |", "| --- | ---: |",
        f"| bits per character | {ev.bits_per_char} |",
        f"| perplexity | {ev.perplexity} |",
        f"| cross-entropy, nats per token | {ev.loss} |",
        f"| next-token accuracy | {ev.token_accuracy} |", "",
        "Bits per character compare models whatever their vocabulary; perplexity only between "
        "models with the same tokenizer.", "",
        "## Intended use and limits", "",
        f"A small model for learning, comparing and demonstrating how language models work. "
        f"It writes text in the style of {corpus['name']} and nothing else: it knows no facts, "
        "loses the thread over longer passages, and repeats itself. Not for any use where its "
        "text would be taken as true or as advice."
        + (" It also infills: given a story's first and last sentence, it writes the middle."
           if infills else ""), "",
        f"## Samples ({sampling}, seeds {', '.join(map(str, SAMPLE_SEEDS))})", "",
    ]
    for text in sample_texts:
        lines += ["> " + text.strip().replace("\n", "\n> "), ""]
    lines += [
        "## Use", "",
        "```bash",
        f"python -m training.generate --checkpoint checkpoints/{name} --prompt \"{corpus['prompt']}\"",
        "```",
    ]
    return "\n".join(lines) + "\n"


def write_card(checkpoint_dir: Path, *, evaluate_again: bool = True) -> Path:
    config_path = checkpoint_dir / "config.json"
    config = json.loads(config_path.read_text())
    if evaluate_again or "evaluation" not in config:
        config["evaluation"] = evaluation_record(checkpoint_dir).to_dict()
        write_json_atomically(config_path, config)
    checkpoint = load_checkpoint(checkpoint_dir)
    corpus = corpus_of(_data_path(checkpoint.training))
    card = render(checkpoint_dir.name, config, samples(checkpoint, corpus["prompt"]),
                  trained_to_infill(checkpoint.training, checkpoint.tokenizer),
                  checkpoint.defaults.described())
    path = checkpoint_dir / CARD_FILE
    path.write_text(card)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.model_card", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, nargs="+", type=Path, help="checkpoint directories")
    parser.add_argument("--no-evaluate", action="store_true",
                        help="reuse the evaluation already in config.json")
    args = parser.parse_args(argv)
    try:
        for directory in args.checkpoint:
            print(write_card(directory, evaluate_again=not args.no_evaluate))
    except (ValueError, OSError, KeyError) as e:  # CheckpointError and DataError among them
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
