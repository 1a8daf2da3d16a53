"""lm-evaluation-harness scores a model Fable serves, as its users run it: the
``local-completions`` model against a real gunicorn, the model's exported tokenizer (its
default ``tokenized_requests=True``: token-id prompts), two prompts a request, a
multiple-choice task (log-likelihoods: ``echo`` with ``logprobs``) and a
``generate_until`` task, both from local files. The log-likelihoods it reads back equal
the ones the model computes for the same strings, and the texts equal Fable's own greedy
texts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tests.gunicorn_server import GunicornServer

lm_eval = pytest.importorskip("lm_eval")

pytestmark = [pytest.mark.server, pytest.mark.interop]

QUESTIONS = [
    {"question": "The cat sat on the", "choices": [" mat", " sky", " ball"], "answer": 0},
    {"question": "Once upon a", "choices": [" time", " dog"], "answer": 0},
    {"question": "She ran to the", "choices": [" park", " moon", " tree"], "answer": 2},
]
PROMPTS = [{"prompt": "Once upon a time", "target": " there"}, {"prompt": "The dog", "target": " ran"},
           {"prompt": "Lily saw", "target": " a"}]
MC_TASK = """task: fable_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
GEN_TASK = """task: fable_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


def write_tasks(folder: Path) -> Path:
    folder.mkdir()
    for name, rows, template in (("mc", QUESTIONS, MC_TASK), ("gen", PROMPTS, GEN_TASK)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (folder / f"{name}.yaml").write_text(template.format(data=data))
    return folder


def fable_loglikelihood(checkpoint, context: str, continuation: str) -> float:
    """The continuation's log-probability after the context, from the model itself, with
    the ids Fable prompts it with (a bos first), split as the harness splits them."""
    from models_src.sampling import encode_prompt

    spaces = len(context) - len(context.rstrip())  # the harness moves them to the continuation
    context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
    whole = encode_prompt(checkpoint.tokenizer, context + continuation)
    start = len(encode_prompt(checkpoint.tokenizer, context))
    with torch.inference_mode():
        logp = torch.log_softmax(checkpoint.model.eval()(torch.tensor([whole]))[0][0].float(), dim=-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(start, len(whole)))


def test_lm_evaluation_harness_scores_a_served_model(checkpoint_dir, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from models_src.checkpoint import load_checkpoint
    from models_src.generation import generate
    from models_src.hf_export import export_checkpoint
    from models_src.sampling import SamplingParams

    served = tmp_path / "served"
    shutil.copytree(checkpoint_dir / "tiny-gpt", served / "tiny-gpt")
    export_checkpoint(served / "tiny-gpt", tmp_path / "export")
    tasks = write_tasks(tmp_path / "tasks")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    checkpoint = load_checkpoint(served / "tiny-gpt")
    with GunicornServer(served) as server:  # every figure below came through it
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": "tiny-gpt", "base_url": f"{server.url}/v1/completions",
                        "tokenizer_backend": "huggingface", "tokenizer": str(tmp_path / "export"),
                        "add_bos_token": True, "max_length": 64, "max_retries": 1, "num_concurrent": 1},
            tasks=["fable_mc", "fable_gen"], task_manager=TaskManager(include_path=str(tasks)),
            batch_size=2, log_samples=True)
    samples = results["samples"]
    scored = [(request, response) for doc in samples["fable_mc"]
              for request, response in zip(doc["arguments"], doc["resps"])]
    assert len(scored) == sum(len(q["choices"]) for q in QUESTIONS)
    for (context, continuation), [(loglikelihood, _greedy)] in scored:
        assert loglikelihood == pytest.approx(fable_loglikelihood(checkpoint, context, continuation), abs=1e-4)

    greedy = SamplingParams(max_new_tokens=8, temperature=0, stop=["."])
    for doc in samples["fable_gen"]:
        prompt = doc["arguments"][0][0]
        [[text]] = doc["resps"]
        assert text == generate(checkpoint.model, checkpoint.tokenizer, prompt, greedy)[0].text
    assert 0 <= results["results"]["fable_mc"]["acc,none"] <= 1
