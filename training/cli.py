"""The ``fable`` command: one name over the ``python -m`` entry points, which keep working.

    fable serve [--host H] [--port P] [--checkpoint-dir D]   # gunicorn -c gunicorn.conf.py ...
    fable train --preset char-gpt --data my_text.txt --name my-model --minutes 10
    fable evaluate | generate | export | data ...            # python -m training.<module> ...

Every subcommand but ``serve`` hands its arguments, untouched, to that module's ``main``
(``fable train --help`` is ``python -m training.train --help``). ``pip install .`` makes
it a console script; from a checkout, ``python -m training.cli``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

# subcommand -> (the module whose main(argv) runs it, what it does); serve is gunicorn's.
COMMANDS = {
    "serve": (None, "start the web app and its APIs on the models in ./checkpoints (gunicorn)"),
    "train": ("training.train", "train a model: --preset and a text file, or --config YAML"),
    "evaluate": ("training.evaluate", "score a checkpoint: perplexity, bits per character, BLEU"),
    "generate": ("training.generate", "write text (or infill a story) with a checkpoint"),
    "export": ("training.export", "export a checkpoint to transformers or GGUF (llama.cpp)"),
    "data": ("training.corpora", "fetch the corpora the shipped configs train on"),
}
GUNICORN_CONF = "gunicorn.conf.py"


def gunicorn_conf() -> Path:
    """gunicorn.conf.py: beside the ``app`` package in a checkout (or an editable install),
    else where ``pip install .`` put it, ``<prefix>/share/fable/`` (pyproject's data-files)."""
    app = importlib.util.find_spec("app")
    places = [Path(app.origin).resolve().parent.parent] if app and app.origin else []
    places += [Path(sysconfig.get_path("data", scheme)) / "share" / "fable"
               for scheme in (sysconfig.get_default_scheme(), f"{os.name}_user")]
    for place in places:
        if (place / GUNICORN_CONF).is_file():
            return place / GUNICORN_CONF
    raise SystemExit(f"fable serve: {GUNICORN_CONF} is in none of {', '.join(map(str, places))}; "
                     "reinstall with `pip install .`")


def serve(argv: list[str]) -> int:
    """Replace this process by gunicorn with the project's settings file, as ``make serve``
    and the Docker image start it: signals (SIGHUP reloads the models) reach gunicorn's master."""
    parser = argparse.ArgumentParser(
        prog="fable serve", description="Serve the web app and its APIs with gunicorn "
        "(every FABLE_* setting of the README applies; the options below set three of them).")
    parser.add_argument("--host", help="address to listen on (FABLE_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (PORT; default 7860)")
    parser.add_argument("--checkpoint-dir", help="the models' folder (FABLE_CHECKPOINT_DIR; "
                        "default ./checkpoints)")
    args = parser.parse_args(argv)
    for variable, value in (("FABLE_HOST", args.host), ("PORT", args.port),
                            ("FABLE_CHECKPOINT_DIR", args.checkpoint_dir)):
        if value is not None:
            os.environ[variable] = str(value)
    models = Path(os.environ.get("FABLE_CHECKPOINT_DIR") or "checkpoints")
    if not models.is_dir():
        print(f"fable serve: no folder of models at {models}: run it in a Fable checkout, or give "
              "--checkpoint-dir (FABLE_CHECKPOINT_DIR)", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "gunicorn", "-c", str(gunicorn_conf()), "app:create_app()"]
    os.execv(sys.executable, command)
    return 0  # not reached: execv does not return


def run_module(command: str, argv: list[str]) -> int:
    return importlib.import_module(COMMANDS[command][0]).main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        command, rest = argv[0], argv[1:]
        return serve(rest) if command == "serve" else run_module(command, rest)
    parser = argparse.ArgumentParser(
        prog="fable", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train, evaluate, compare and serve small language models.",
        epilog="commands:\n"
        + "\n".join(f"  {name:9} {about}" for name, (_, about) in COMMANDS.items())
        + "\n\n`fable COMMAND --help` shows a command's options.")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of those below")
    parser.parse_args(argv)  # --help, no command or an unknown one: a message and exit 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
