"""params.yaml validation: every problem names its dotted key path; the CLI stops early."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config.params import Params, ParamsError, load_params, parse_params
from tests.conftest import REPO, raw_params, with_overrides

SUBCOMMANDS = ("fetch", "prepare", "train", "evaluate", "summary")


def problems(error: ParamsError) -> list[str]:
    """The per-key lines of a ParamsError message (the first line names the source)."""
    return [line.strip() for line in str(error).splitlines()[1:]]


def test_repo_params_validate() -> None:
    params = load_params(REPO / "params.yaml")

    assert isinstance(params, Params)
    assert params.seed == 42
    assert params.prepare.val_size == 5000
    assert params.prepare.train_limit is None
    assert params.train.model("cnn") is params.train.cnn
    assert params.train.cnn.batch_size % params.train.scaling.num_workers == 0
    assert params.fetch.mirrors, "at least one public mirror is configured"


def test_repo_params_dump_back_as_written() -> None:
    """Each key stays where params.yaml has it (`tune.cnn.channels`, `train.mlp.net`, ...)."""
    raw = raw_params()

    assert parse_params(raw).model_dump(mode="json") == raw


def test_small_profile_of_the_repo_params_validates() -> None:
    raw = with_overrides(raw_params(), {"prepare.train_limit": 2500, "prepare.val_size": 500})

    assert parse_params(raw).prepare.train_limit == 2500


@pytest.mark.parametrize(
    ("overrides", "key_path", "detail"),
    [
        pytest.param({"train.cnn.lrr": 0.01}, "train.cnn.lrr", "unknown key", id="unknown-key"),
        pytest.param({"tran.cnn.lr": 0.01}, "tran", "unknown key", id="unknown-section"),
        pytest.param(
            {"train.mlp.epochs": "ten"}, "train.mlp.epochs", "valid integer", id="wrong-type"
        ),
        pytest.param({"train.cnn.lr": -1}, "train.cnn.lr", "greater than 0", id="negative-lr"),
        pytest.param(
            {"train.scaling.num_workers": 0},
            "train.scaling.num_workers",
            "greater than 0",
            id="no-workers",
        ),
        pytest.param(
            {"prepare.train_limit": 1000, "prepare.val_size": 1000},
            "prepare.val_size",
            "smaller than the training images available (1000)",
            id="val-equals-train-limit",
        ),
        pytest.param(
            {"prepare.train_limit": 1000, "prepare.val_size": 1500},
            "prepare.val_size",
            "smaller than the training images available (1000)",
            id="val-above-train-limit",
        ),
        pytest.param(
            {"prepare.val_size": 60_000},
            "prepare.val_size",
            "smaller than the training images available (60000)",
            id="val-is-all-of-mnist",
        ),
        pytest.param(
            {"prepare.test_limit": 10_001}, "prepare.test_limit", "10000", id="test-limit"
        ),
        pytest.param(
            {"train.cnn.net.channels": [8, 16, 32, 64, 128]},
            "train.cnn.net.channels",
            "at most 4",
            id="too-many-blocks",
        ),
        pytest.param(
            {"train.mlp.net.dropout": 1.0}, "train.mlp.net.dropout", "less than 1", id="dropout"
        ),
    ],
)
def test_invalid_value_names_its_key_path(
    overrides: dict[str, Any], key_path: str, detail: str
) -> None:
    raw = with_overrides(raw_params(), overrides)

    with pytest.raises(ParamsError) as caught:
        parse_params(raw, "bad.yaml")

    assert str(caught.value).startswith("invalid parameters in bad.yaml:")
    lines = problems(caught.value)
    assert len(lines) == 1, str(caught.value)
    assert lines[0].startswith(f"{key_path}: "), lines[0]
    assert detail in lines[0]


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_batch_size_must_split_evenly_across_workers(model: str) -> None:
    raw = with_overrides(
        raw_params(), {"train.scaling.num_workers": 4, f"train.{model}.batch_size": 130}
    )

    with pytest.raises(ParamsError) as caught:
        parse_params(raw, "bad.yaml")

    lines = problems(caught.value)
    assert len(lines) == 1, str(caught.value)
    # The validator sits on the model section, so the path names the section, and the
    # message names the key and both values.
    assert lines[0].startswith(f"train.{model}: ")
    assert "batch_size (130) must be a multiple of train.scaling.num_workers (4)" in lines[0]


def test_every_problem_is_reported_at_once() -> None:
    raw = with_overrides(
        raw_params(),
        {"train.cnn.lrr": 0.01, "train.mlp.epochs": "ten", "train.scaling.num_workers": 0},
    )

    with pytest.raises(ParamsError) as caught:
        parse_params(raw, "bad.yaml")

    paths = sorted(line.split(":")[0] for line in problems(caught.value))
    assert paths == ["train.cnn.lrr", "train.mlp.epochs", "train.scaling.num_workers"]


def test_missing_required_section_is_named() -> None:
    raw = raw_params()
    del raw["train"]["mlp"]

    with pytest.raises(ParamsError) as caught:
        parse_params(raw, "bad.yaml")

    assert problems(caught.value) == ["train.mlp: Field required"]


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ParamsError, match=r"^list.yaml: expected a mapping .* got list$"):
        parse_params(["seed", 42], "list.yaml")


def test_load_params_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"

    with pytest.raises(ParamsError) as caught:
        load_params(missing)

    assert str(caught.value) == f"{missing}: no such params file"


def test_load_params_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: 42\ntrain: [unclosed\n")

    with pytest.raises(ParamsError) as caught:
        load_params(broken)

    assert str(caught.value).startswith(f"{broken}: not valid YAML")


def test_load_params_empty_file_names_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")

    with pytest.raises(ParamsError, match="expected a mapping") as caught:
        load_params(empty)

    assert str(empty) in str(caught.value)


def test_load_params_reports_the_file_as_source(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(with_overrides(raw_params(), {"train.cnn.lr": 0})))

    with pytest.raises(ParamsError) as caught:
        load_params(path)

    assert str(caught.value).startswith(f"invalid parameters in {path}:")
    assert problems(caught.value)[0].startswith("train.cnn.lr: ")


def test_cli_rejects_bad_params_before_doing_any_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    paths = {f"paths.{k}": str(out / k) for k in ("raw", "prepared", "models", "metrics", "plots")}
    bad = with_overrides(raw_params(), paths | {"train.cnn.lrr": 0.01})
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(yaml.safe_dump(bad))

    result = CliRunner().invoke(app, ["prepare", "-p", str(bad_file)])

    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: invalid parameters in {bad_file}:")
    assert "train.cnn.lrr: unknown key" in result.stderr
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_cli_missing_params_file_fails_cleanly(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"

    result = CliRunner().invoke(app, ["summary", "-p", str(missing)])

    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {missing}: no such params file"


def test_cli_top_level_help_lists_every_subcommand() -> None:
    result = CliRunner().invoke(app, ["--help"])

    assert result.exit_code == 0, result.output
    for command in SUBCOMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_cli_subcommand_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])

    assert result.exit_code == 0, result.output
    assert "--params" in result.output
    if command in {"train", "evaluate"}:
        assert "--model" in result.output
