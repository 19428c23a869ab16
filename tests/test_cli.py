"""The CLI as a user runs it: a real subprocess, exit codes, stdout data, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from tpool_cli.cli import main


def tpool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "tpool_cli", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_profile_json_is_parseable():
    proc = tpool("profile", "--model", "deit_tiny_patch16_224", "--op", "topk,grid", "--keep", "0.9,0.7", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    rows = payload["results"]
    assert [(r["op"], r["keep"]) for r in rows] == [("none", 1.0), ("topk", 0.9), ("topk", 0.7), ("grid", 0.9), ("grid", 0.7)]
    assert rows[0]["gmacs"] == pytest.approx(1.258, rel=1e-3)
    assert all(r["gmacs"] < rows[0]["gmacs"] for r in rows[1:])
    assert len(rows[1]["per_layer"]) == 12


def test_profile_table_and_csv_output(tmp_path):
    out = tmp_path / "profile.csv"
    proc = tpool("profile", "--model", "deit_tiny_patch16_224", "--op", "random", "--tokens", "150,100,50", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "GMACs" in proc.stdout and "150" in proc.stdout
    lines = out.read_text().splitlines()
    assert lines[0].startswith("model,op,keep") and len(lines) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "not_a_model"], "unknown model"),
        (["--op", "nope"], "unknown operator"),
        (["--keep", "0"], "keep rate must be in (0, 1]"),
        (["--keep", "1.5"], "keep rate must be in (0, 1]"),
        (["--layers", "3,12"], "out of range"),
        (["--weights", "/nonexistent/w.pth"], "weights file not found"),
        (["--format", "xml"], "unknown format"),
        (["--keep", "0.5", "--tokens", "150,100,50"], "not both"),
        (["--op", ""], "--ops is empty"),
        (["--model", "resnet18"], "not a timm VisionTransformer"),
    ],
)
def test_bad_input_is_one_line_no_traceback(args, message, capsys):
    argv = ["profile", *args] if "--model" in args else ["profile", "--model", "deit_tiny_patch16_224", *args]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0] and "Traceback" not in err


def test_bad_input_in_a_real_process():
    proc = tpool("profile", "--keep", "2")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: keep rate must be in (0, 1], got 2"


def test_module_and_help():
    proc = tpool("--help")
    assert proc.returncode == 0 and "profile" in proc.stdout


# --- Generic operator options (--op-opt) and the version (in-process: no model is built) ---

def _main(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["profile", "--op", "topk", "--op-opt", "iters=3"], "no operator of topk has an option 'iters' (their options: score)"),
        (["bench", "--op", "topk,grid", "--op-opt", "colour=red"], "option 'colour'"),
        (["profile", "--op", "kmeans", "--op-opt", "iters=three"], "kmeans: iters must be int, got 'three'"),
        (["profile", "--op", "kmeans", "--op-opt", "init=kmeans++"], "init must be one of significance, farthest"),
        (["profile", "--op", "kmeans", "--op-opt", "iters"], "--op-opt takes KEY=VALUE"),
        (["profile", "--op", "kmeans", "--iters", "3", "--op-opt", "iters=4"], "iters given twice"),
        (["evaluate", "--op", "topk", "--op-opt", "iters=3"], "no operator of topk has an option 'iters'"),
        (["recon", "--op", "topk", "--op-opt", "nope=1"], "option 'nope'"),
        (["visualize", "x.png", "--model", "deit_tiny_patch16_224", "--op", "grid", "--op-opt", "nope=1"], "option 'nope'"),
    ],
)
def test_op_opt_errors_are_one_line_before_any_model(argv, message, capsys):
    code, out, err = _main(argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_op_opt_and_aliases_take_the_same_path():
    from tpool_cli.cli_options import op_options
    from tpool_cli.ops import make_operators

    by_flag = make_operators(["topk", "kmeans"], op_options(None, score="received", iters=3, init=None, features=None))
    by_opt = make_operators(["topk", "kmeans"], op_options(["score=received", "iters=3"]))
    assert by_flag == by_opt
    assert [op.label() for op in by_opt] == ["topk(score=received)", "kmeans(iters=3)"]


_COMMAND_HEADS = {  # what each command needs before its operator options (visualize: an image and a model)
    "profile": ["profile"], "evaluate": ["evaluate"], "pareto": ["pareto"], "bench": ["bench"], "recon": ["recon"],
    "finetune": ["finetune"], "visualize": ["visualize", "x.png", "--model", "deit_tiny_patch16_224"],
}


@pytest.mark.parametrize("command", sorted(_COMMAND_HEADS))
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--op", "atc", "--linkage", "ward"], "atc: linkage must be one of average, complete, single, got 'ward'"),
        (["--op", "dpcknn", "--knn", "0"], "dpcknn: knn must be >= 1, got 0"),
        (["--op", "atc", "--linkage", "single", "--op-opt", "linkage=complete"], "linkage given twice"),
        (["--op", "tome", "--knn", "3"], "no operator of tome has an option 'knn'"),
    ],
)
def test_linkage_and_knn_flags_reach_the_operator_in_every_command(command, flags, message, capsys):
    """--linkage (atc) and --knn (dpcknn), the flags issue 13 names, are --op-opt aliases in every command."""
    code, out, err = _main(_COMMAND_HEADS[command] + flags, capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_linkage_and_knn_flags_build_the_operators_op_opt_builds():
    from tpool_cli.cli_options import op_options
    from tpool_cli.ops import make_operators

    by_flag = make_operators(["atc", "dpcknn"], op_options(None, linkage="complete", knn=3))
    by_opt = make_operators(["atc", "dpcknn"], op_options(["linkage=complete", "knn=3"]))
    assert by_flag == by_opt
    assert [op.label() for op in by_flag] == ["atc(linkage=complete)", "dpcknn(knn=3)"]


def test_linkage_flag_runs_on_the_demo(capsys):
    code, out, err = _main(["evaluate", "--op", "atc", "--linkage", "single", "--keep", "0.5", "--limit", "8", "-f", "json"], capsys)
    result = json.loads(out)
    assert code == 0 and result["op"] == "atc(linkage=single)" and result["op_options"] == {"linkage": "single"}


def test_every_dataclass_field_is_an_op_opt():
    """A new option needs no CLI edit: every field of every operator parses from text."""
    from dataclasses import fields

    from tpool_cli.ops import get_operator_class, make_operator, operator_names

    for name in operator_names():
        for f in fields(get_operator_class(name)):
            default = getattr(get_operator_class(name)(), f.name)
            text = str(default).lower() if isinstance(default, bool) else str(default)
            assert getattr(make_operator(name, **{f.name: text}), f.name) == default, (name, f.name)


def test_version_and_ops_listing(capsys):
    from tpool_cli.cli import version
    from tpool_cli.ops import get_operator_class

    code, out, _ = _main(["--version"], capsys)
    assert code == 0 and out.strip() == f"tpool {version()}"
    code, out, _ = _main(["ops", "-f", "json"], capsys)
    listed = {r["op"]: r["options"] for r in json.loads(out)["operators"]}
    assert code == 0 and listed["kmeans"]["iters"] == {"type": "int", "default": 5}
    assert listed["topk"]["score"]["type"] == "cls|received"
    about = {r["op"]: r["about"] for r in json.loads(out)["operators"]}
    assert about["grid"] == get_operator_class("grid").summary and about["drop"].startswith("speed reference")
