"""The tune section's validation: key paths named, YAML floats as DVC writes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config.params import ParamsError, load_params, parse_params
from tests.conftest import REPO, raw_params, with_overrides


def test_tune_section_is_validated_naming_the_key() -> None:
    cases = {
        "tune.mlp.lr: low (0.01) must be below high (0.001)": {
            "tune.mlp.lr": {"low": 0.01, "high": 0.001}
        },
        "tune.cnn: start_from.0.lr: 0.5 is outside lr": {
            "tune.cnn.start_from": [
                {"lr": 0.5, "dropout": 0.1, "batch_size": 128, "channels": [32, 64, 128]}
            ]
        },
        "tune: scheduler.grace_period (7) exceeds mlp.epochs (6)": {
            "tune.scheduler.grace_period": 7
        },
        "tune: mlp.batch_size: [64, 128, 256] not a multiple of scaling.num_workers (3)": {
            "tune.scaling.num_workers": 3
        },
        "tune.cnn.channels.0: List should have at most 4 items": {
            "tune.cnn.channels": [[8, 16, 32, 64, 128]]
        },
        "tune.mlp.hidden_sizes: choices must differ": {"tune.mlp.hidden_sizes": [[64], [64]]},
        "tune.mlp.num_sample: unknown key": {"tune.mlp.num_sample": 3},
    }
    for expected, overrides in cases.items():
        with pytest.raises(ParamsError) as caught:
            parse_params(with_overrides(raw_params(), overrides))
        assert expected in str(caught.value)


def test_a_dotless_exponent_is_a_number(tmp_path: Path) -> None:
    """`dvc exp run -S train.mlp.lr=0.00001` writes `lr: 1e-05`: still a float to the pipeline."""
    text = (REPO / "params.yaml").read_text().replace("lr: 0.003\n", "lr: 1e-05\n")
    assert "lr: 1e-05\n" in text
    (tmp_path / "params.yaml").write_text(text)

    assert load_params(tmp_path / "params.yaml").train.mlp.lr == 1e-05
