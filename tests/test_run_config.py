"""One run-config schema: pyproject.toml, RunSettings, the client's defaults and the documented table follow it."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from flwr_nnunet.apps.client import site_spec
from flwr_nnunet.apps.run_config import RUN_CONFIG, RUN_CONFIG_KEYS, RunSettings, markdown_table

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- run-config table:", "<!-- end run-config table -->"


def test_pyproject_run_config_is_the_schema_defaults_in_order():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    # type() too: True == 1 and 1 == 1.0 in Python, but not in a TOML run config.
    assert [(k, type(v), v) for k, v in config.items()] == [(s.key, s.type, s.default) for s in RUN_CONFIG]
    assert list(RUN_CONFIG_KEYS) == [s.key for s in RUN_CONFIG]
    assert all(type(s.default) is s.type and s.meaning for s in RUN_CONFIG)


def test_run_settings_defaults_are_the_schema_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    settings = RunSettings.from_run_config({})
    assert (settings.num_rounds, settings.iterations_per_epoch, settings.val_iterations_per_epoch) == (8, 40, 5)
    for s in RUN_CONFIG:
        if s.key in ("strategy-options", "dp-options", "labels", "data-root", "results-dir"):
            continue
        attribute = "num_rounds" if s.key == "num-server-rounds" else s.key.replace("-", "_")
        value = getattr(settings, attribute)
        assert (type(value), value) == (s.type, s.default), s.key
    assert settings.strategy_options == {} and settings.dp_options == {} and settings.labels == {}
    assert settings.data_root == tmp_path / "flwr-nnunet-demo"
    assert settings.results_dir == tmp_path / "flwr-nnunet-demo" / "server" / "nnUNet_results"


def test_site_spec_defaults_are_the_schema_defaults(tmp_path):
    spec = site_spec({"data-root": str(tmp_path)}, {"partition-id": 1})
    defaults = {s.key: s.default for s in RUN_CONFIG}
    assert (spec.dataset, spec.configuration, spec.plans, spec.trainer, spec.device) == tuple(
        defaults[k] for k in ("dataset", "configuration", "plans", "trainer", "device")
    )
    assert spec.fold == int(defaults["fold"])
    assert spec.nnunet_preprocessed == tmp_path / "site-1" / "nnUNet_preprocessed"


def test_the_documented_run_config_table_is_rendered_from_the_schema():
    page = (REPO / "documentation" / "run-config.md").read_text()
    assert page.count(BEGIN) == 1 and page.count(END) == 1
    section = page[page.index(BEGIN) : page.index(END)]
    table = section.split("\n", 1)[1]
    assert table == markdown_table()
    assert table.count("\n") == len(RUN_CONFIG) + 2


@pytest.mark.parametrize(
    ("key", "value", "kind"),
    [
        ("local-epochs", "x", "int"),
        ("round-timeout", "soon", "float"),
        ("make-demo", "yes", "bool"),
        ("seed", True, "int"),
    ],
)
def test_a_wrong_typed_value_names_the_key_and_the_type(key, value, kind):
    with pytest.raises(ValueError, match=f"run-config '{key}' must be {kind}") as error:
        RunSettings.from_run_config({key: value})
    assert repr(value) in str(error.value)


def test_values_that_convert_exactly_are_accepted():
    settings = RunSettings.from_run_config({"local-epochs": "3", "proximal-mu": 1, "resume": "true", "fold": 2})
    assert (settings.local_epochs, settings.proximal_mu, settings.resume, settings.fold) == (3, 1.0, True, "2")
    assert type(settings.proximal_mu) is float
