"""Stands in for ``python -m training.train --preset ...`` in the training page's fast
tests: it takes the same arguments, answers ``--check`` and writes the records the real
command writes (metrics.jsonl in its output.dir), in a fraction of a second. What it
does then is ``FAKE_TRAINER``: ``finish`` (publish a copy of ``FAKE_MODEL`` with a model
card), ``fail`` (an ``error:`` line, exit 1) or ``hang`` (train until killed; on SIGINT,
publish and exit 130, as the real one does).
The real command runs in tests/pages/test_browser_train.py and the restart test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path


def parse(argv: list[str]) -> tuple[dict, dict, set]:
    options, overrides, flags = {}, {}, set()
    args = argv[2:] if argv[:2] == ["-m", "training.train"] else argv
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--quiet", "--check"):
            flags.add(arg)
            i += 1
        elif arg.startswith("--"):
            options[arg], i = args[i + 1], i + 2
        else:
            key, _, value = arg.partition("=")
            overrides[key], i = value, i + 1
    return options, overrides, flags


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as training.train's ctrl_c_finishes
    options, overrides, flags = parse(argv)
    text = Path(options["--data"]).read_text() if "--data" in options else "a corpus"
    if "--check" in flags:
        if "too short" in text:
            print(f"error: {options['--data']} is too short for char-gpt's 128-token context",
                  file=sys.stderr)
            return 2
        return 0
    work = Path(overrides["output.dir"])
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "metrics.jsonl", "w") as records:
        def record(value: dict) -> None:
            records.write(json.dumps({"time": time.time(), **value}) + "\n")
            records.flush()
        record({"event": "start", "run_id": "fake", "step": 0})
        for step in range(1, 6):
            record({"step": step, "group": "train", "values": {"loss": 4.0 - step / 10}})
        record({"step": 5, "group": "validation", "values": {"loss": 3.6, "bits_per_char": 5.19}})
        record({"step": 5, "group": "sample", "text": "To be, or not"})
    mode = os.environ.get("FAKE_TRAINER", "finish")
    if mode == "fail":
        print("error: the fake training failed on purpose", file=sys.stderr)
        return 1
    if mode == "hang":
        try:
            with open(work / "metrics.jsonl", "a") as records:  # said once Ctrl-C is handled
                records.write(json.dumps({"time": time.time(), "event": "hanging"}) + "\n")
            while True:
                time.sleep(1)
        except KeyboardInterrupt:  # Ctrl-C (Finish now): publish what there is
            publish(options)
            return 130
    publish(options)
    return 0


def publish(options: dict) -> None:
    target = Path(options["--checkpoint-dir"]) / options["--name"]
    shutil.copytree(os.environ["FAKE_MODEL"], target)
    (target / "README.md").write_text(f"# {options['--name']}\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
