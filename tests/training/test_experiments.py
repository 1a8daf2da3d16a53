"""Experiment records: Parquet round-trips, atomic rewrites, DuckDB queries, the CLI, the PNG."""

import json
import math
import re
import struct
from datetime import datetime, timedelta, timezone

import pyarrow.parquet as pq
import pytest

from models_src import records
from models_src.records import (SCHEMA, ExperimentLog, best, compare, connect, git_commit, leaderboard,
                                new_run_id, query)
from training.experiments import main, plot_curves, summary_table

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def required(step=0, **extra):
    """The columns a caller must give (the log fills in the rest)."""
    return dict(model="gpt-tiny", architecture="gpt", parameters=12345, step=step,
                epoch=step / 100, wall_time_s=step * 0.5, kind="train_eval") | extra


def make_run(root, experiment, values, metric="val_perplexity", **extra):
    """A run whose rows carry ``values`` of ``metric`` at steps 0, 10, 20, ..."""
    log = ExperimentLog(root, experiment, config={"lr": 1e-3})
    for i, value in enumerate(values):
        log.log(**required(10 * i, **extra), **{metric: value},
                timestamp=T0 + timedelta(seconds=len(log.rows)))
    return log


def test_rows_round_trip_with_automatic_columns(tmp_path):
    log = ExperimentLog(tmp_path, "charlm", config={"lr": 3e-4, "out": tmp_path})
    log.log(**required(0), train_loss=4.2, val_loss=4.3, split="validation")
    log.log(**required(100), train_loss=2.5, tokens_seen=51200, learning_rate=3e-4)
    assert log.path == tmp_path / "charlm" / f"{log.run_id}.parquet"

    rows = pq.read_table(log.path).to_pylist()
    assert rows == log.rows
    assert [r["step"] for r in rows] == [0, 100]
    assert rows[0]["val_loss"] == 4.3 and rows[1]["val_loss"] is None
    assert rows[1]["tokens_seen"] == 51200 and rows[0]["tokens_seen"] is None
    assert rows[0]["experiment"] == "charlm" and rows[0]["run_id"] == log.run_id
    assert json.loads(rows[0]["config"]) == {"lr": 3e-4, "out": str(tmp_path)}
    assert rows[0]["timestamp"].utcoffset() == timedelta(0)
    assert rows[0]["git_commit"] == git_commit()

    back = query(tmp_path, "SELECT step, train_loss, val_loss, kind FROM experiments ORDER BY step")
    assert back == [{"step": 0, "train_loss": 4.2, "val_loss": 4.3, "kind": "train_eval"},
                    {"step": 100, "train_loss": 2.5, "val_loss": None, "kind": "train_eval"}]


def test_every_file_has_the_same_schema(tmp_path):
    sparse = ExperimentLog(tmp_path, "a")
    sparse.log(**required())
    full = ExperimentLog(tmp_path, "b")
    full.log(**required(), train_loss=1.0, val_loss=1.1, val_perplexity=3.0, token_accuracy=0.5,
             bits_per_char=1.5, bleu=20.0, tokens_per_s=900.0, tokens_seen=10, learning_rate=0.1,
             split="test", git_commit="abc")
    for log in (sparse, full):
        assert pq.read_schema(log.path).remove_metadata().equals(SCHEMA)
    names = [r["column_name"] for r in query(tmp_path, "DESCRIBE experiments")]
    assert names == SCHEMA.names
    assert query(tmp_path, "SELECT count(*) AS n FROM experiments") == [{"n": 2}]


def test_unknown_and_missing_columns_are_rejected_and_nothing_is_written(tmp_path):
    log = ExperimentLog(tmp_path, "x")
    with pytest.raises(ValueError, match="unknown experiment columns: perplexity, vall_loss"):
        log.log(**required(), vall_loss=1.0, perplexity=2.0)
    with pytest.raises(ValueError, match="missing experiment columns: parameters, kind"):
        log.log(**{k: v for k, v in required().items() if k not in ("parameters", "kind")})
    with pytest.raises(ValueError, match="set by the ExperimentLog"):
        log.log(**required(), run_id="other")
    assert log.rows == [] and not log.path.exists()


@pytest.mark.parametrize("name", ["", "../up", "a/b", ".hidden"])
def test_names_that_are_not_plain_file_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="plain file name"):
        ExperimentLog(tmp_path, name)


def test_run_ids_are_time_sortable_and_unique():
    ids = [new_run_id() for _ in range(50)]
    assert all(re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", i) for i in ids)
    assert len(set(ids)) == 50
    assert ids[0][:15] <= ids[-1][:15]


def test_a_crash_while_writing_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    log = ExperimentLog(tmp_path, "crash")
    log.log(**required(0), train_loss=3.0)

    def half_write(table, where):
        where.write(b"PAR1 half a file")
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(records.pq, "write_table", half_write)
        with pytest.raises(OSError, match="disk full"):
            log.log(**required(10), train_loss=2.0)

    assert [p.name for p in log.path.parent.iterdir()] == [log.path.name]  # no temp file left
    assert query(tmp_path, "SELECT step FROM experiments") == [{"step": 0}]
    assert len(log.rows) == 1  # the failed row is not half-remembered: retrying is safe
    log.log(**required(10), train_loss=2.0)
    assert [r["step"] for r in pq.read_table(log.path).to_pylist()] == [0, 10]


def test_resuming_a_run_keeps_its_rows_and_config(tmp_path):
    first = ExperimentLog(tmp_path, "resume", config={"seed": 1})
    first.log(**required(0), train_loss=3.0)
    first.log(**required(10), train_loss=2.0)

    resumed = ExperimentLog(tmp_path, "resume", run_id=first.run_id)
    assert resumed.rows == first.rows
    resumed.log(**required(20), train_loss=1.0)
    rows = query(tmp_path, "SELECT run_id, step, config FROM experiments ORDER BY step")
    assert [r["step"] for r in rows] == [0, 10, 20]
    assert {r["run_id"] for r in rows} == {first.run_id}
    assert {json.loads(r["config"])["seed"] for r in rows} == {1}


def test_best_lower_is_better_one_row_per_run(tmp_path):
    a = make_run(tmp_path, "charlm", [9.0, 4.0, 5.0])
    b = make_run(tmp_path, "charlm", [8.0, 3.0, math.nan])  # NaN never wins
    c = make_run(tmp_path, "bpe", [7.0, 6.0])
    rows = best(tmp_path, "val_perplexity")
    assert [(r["run_id"], r["val_perplexity"], r["step"]) for r in rows] == [
        (b.run_id, 3.0, 10), (a.run_id, 4.0, 10), (c.run_id, 6.0, 10)]
    assert [r["run_id"] for r in best(tmp_path, "val_perplexity", top=1)] == [b.run_id]
    assert [r["run_id"] for r in best(tmp_path, experiment="bpe")] == [c.run_id]


def test_the_leaderboard_ranks_by_bits_per_char_then_perplexity(tmp_path):
    """Perplexity is per token of each run's vocabulary: a word model's is far higher than
    a character model's at the same bits per character. Runs without bits per char follow."""
    def run(experiment, rows):
        log = ExperimentLog(tmp_path, experiment)
        for step, (perplexity, bpc) in enumerate(rows):
            log.log(**required(10 * step), val_perplexity=perplexity, bits_per_char=bpc)
        return log.run_id

    word = run("word", [(300.0, None), (180.0, 1.25), (170.0, 1.22)])
    char = run("char", [(4.0, 1.60), (3.5, 1.45)])
    infill = run("infill", [(2.5, None), (2.2, math.nan)])
    partial = run("partial", [(9.0, None)])
    rows = leaderboard(tmp_path)
    assert [(r["run_id"], r["val_perplexity"]) for r in rows] == [
        (word, 170.0), (char, 3.5), (infill, 2.2), (partial, 9.0)]
    assert [r["run_id"] for r in leaderboard(tmp_path, top=2)] == [word, char]


def test_best_higher_is_better(tmp_path):
    a = make_run(tmp_path, "e", [0.2, 0.6, 0.5], metric="token_accuracy")
    b = make_run(tmp_path, "e", [0.7, 0.1], metric="token_accuracy")
    make_run(tmp_path, "e", [None], metric="token_accuracy")  # a run without the metric is left out
    rows = best(tmp_path, "token_accuracy")
    assert [(r["run_id"], r["token_accuracy"]) for r in rows] == [(b.run_id, 0.7), (a.run_id, 0.6)]
    with pytest.raises(ValueError, match="unknown metric 'accuracy'"):
        best(tmp_path, "accuracy")


def test_compare_takes_the_latest_row_of_each_name(tmp_path):
    a = make_run(tmp_path, "charlm", [9.0, 4.0], model="gru-small")
    b = make_run(tmp_path, "bpe", [7.0, 6.0, 5.0], model="gpt-small")
    rows = compare(tmp_path, ["bpe", "gru-small", a.run_id])
    assert [(r["run_id"], r["step"]) for r in rows] == [(b.run_id, 20), (a.run_id, 10),
                                                          (a.run_id, 10)]
    with pytest.raises(ValueError, match="no experiment, model or run id named 'nope'"):
        compare(tmp_path, ["bpe", "nope"])


def test_an_empty_root_is_an_empty_table_not_an_error(tmp_path, capsys):
    for root in (tmp_path, tmp_path / "missing"):
        assert query(root, "SELECT * FROM experiments") == []
        assert [r["column_name"] for r in query(root, "DESCRIBE experiments")] == SCHEMA.names
        assert best(root) == []
    assert main(["--root", str(tmp_path), "--list"]) == 0
    assert "(no rows)" in capsys.readouterr().out
    connect(tmp_path).close()


def test_cli_prints_tables(tmp_path, capsys):
    run = make_run(tmp_path, "charlm", [9.0, 4.0])
    assert main(["--root", str(tmp_path), "--best", "val_perplexity"]) == 0
    out = capsys.readouterr().out
    assert run.run_id in out and "val_perplexity" in out
    assert "bleu" not in out  # columns without values are left out
    assert main(["--root", str(tmp_path), "--sql", "SELECT count(*) AS n FROM experiments",
                 "--markdown"]) == 0
    assert capsys.readouterr().out.splitlines() == ["|   n |", "| --: |", "|   2 |"]
    assert main(["--root", str(tmp_path), "--list"]) == 0
    assert re.search(r"charlm\s+1\s+2\s+4", capsys.readouterr().out)


@pytest.mark.parametrize("argv, message", [
    (["--sql", "SELEC * FROM experiments"], "Parser Error"),
    (["--sql", "SELECT nope FROM experiments"], "nope"),
    (["--best", "accuracy"], "invalid choice"),
    (["--compare", "ghost"], "no experiment, model or run id named 'ghost'"),
    (["--plot", "ghost"], "--plot needs --out"),
])
def test_cli_errors_are_clean(tmp_path, capsys, argv, message):
    make_run(tmp_path, "charlm", [9.0])
    with pytest.raises(SystemExit) as exit:
        main(["--root", str(tmp_path), *argv])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_summary_table_aligns_and_formats():
    rows = [{"model": "gpt", "step": 1200, "ppl": 3.14159, "tps": 12345.6, "note": None},
            {"model": "a|b", "step": 5, "ppl": 10.0, "tps": 2.0, "note": "x"}]
    assert summary_table(rows).splitlines() == [
        "model   step    ppl     tps  note",
        "-----  -----  -----  ------  ----",
        "gpt    1,200  3.142  12,346",
        "a|b        5     10       2  x",
    ]
    assert summary_table(rows, ["ppl", "model"], markdown=True).splitlines() == [
        "|   ppl | model |", "| ----: | ----- |", "| 3.142 | gpt   |", "|    10 | a\\|b  |"]
    assert summary_table([]) == "(no rows)"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_curves_writes_a_real_png(tmp_path):
    log = ExperimentLog(tmp_path, "exp")
    for step, (train, val) in enumerate([(3.0, 3.2), (2.0, 2.4), (1.5, 2.1)]):
        log.log(**required(step * 100), train_loss=train, val_loss=val)
    out = plot_curves(tmp_path, log.run_id, tmp_path / "plots" / "loss.png")
    assert png_size(out.read_bytes()) == (640, 400)
    assert out.stat().st_size > 5_000  # axes, two curves and a legend, not a blank image
    assert main(["--root", str(tmp_path), "--plot", log.run_id, "--out",
                 str(tmp_path / "cli.png")]) == 0
    assert png_size((tmp_path / "cli.png").read_bytes()) == (640, 400)
    with pytest.raises(ValueError, match="no run"):
        plot_curves(tmp_path, "ghost", tmp_path / "x.png")


def test_plot_of_a_single_point_does_not_divide_by_zero(tmp_path):
    log = ExperimentLog(tmp_path, "exp")
    log.log(**required(0), val_loss=2.0)
    assert png_size(plot_curves(tmp_path, log.run_id, tmp_path / "p.png").read_bytes()) == (640, 400)


def test_git_commit(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_commit(tmp_path) is None
    assert git_commit(tmp_path / "does-not-exist") is None
    head = git_commit()  # this checkout (None where git itself is missing)
    assert head is None or re.fullmatch(r"[0-9a-f]{40}", head)
