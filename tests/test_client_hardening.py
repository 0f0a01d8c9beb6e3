"""A site answers every malformed or poisoned instruction with an error reply and leaves its state untouched.

Items 10-14 of issue 10, through ``client_app.app`` called the way Flower calls it
(``app(message, context)``), on a site whose state file was written by one real,
tiny training round.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Context, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from test_site import demo, initial_weights  # noqa: F401 - the module-scoped demo fixture

from flwr_nnunet.apps.client import live_site
from flwr_nnunet.core.aliasing import AliasMap
from flwr_nnunet.core.codec import to_array_record
from flwr_nnunet.nnunet.digests import plans_sha256
from flwr_nnunet.site.site import Site
from flwr_nnunet.site.spec import DEFAULT_MAX_LOCAL_EPOCHS, InstructionError, TrainOptions
from flwr_nnunet.site.trainer_state import first_non_finite

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from client_app import app  # the ClientApp of the project, as Flower loads it (after the sys.path entry)

_RUN_IDS = iter(range(7000, 8000))


# ----------------------------------------------------------------- pure checks
def test_train_options_refuse_malformed_entries():
    good = {"server-round": 2, "local-epochs": 1}
    assert TrainOptions.from_config(good).server_round == 2
    assert TrainOptions.from_config({**good, "local-epochs": 2.0}).local_epochs == 2
    refused = [
        ({"local-epochs": 1}, "no 'server-round'"),
        ({**good, "server-round": 0}, "'server-round' must be at least 1"),
        ({**good, "server-round": True}, "'server-round' must be an integer"),
        ({**good, "local-epochs": "two"}, "'local-epochs' must be an integer"),
        ({**good, "local-epochs": 1.5}, "'local-epochs' must be an integer"),
        ({**good, "local-epochs": 0}, "'local-epochs' must be at least 1"),
        ({**good, "local-epochs": -3}, "'local-epochs' must be at least 1"),
        ({**good, "local-epochs": 10**6}, f"bound of {DEFAULT_MAX_LOCAL_EPOCHS}"),
        ({**good, "num-epochs": 0}, "'num-epochs' must be at least 1"),
        ({**good, "iterations-per-epoch": "many"}, "'iterations-per-epoch' must be an integer"),
        ({**good, "seed": 1.5}, "'seed' must be an integer"),
        ({**good, "proximal-mu": math.nan}, "'proximal-mu' must be a finite number"),
        ({**good, "proximal-mu": -1.0}, "'proximal-mu' must be >= 0"),
    ]
    for config, fragment in refused:
        with pytest.raises(InstructionError, match=fragment):
            TrainOptions.from_config(config)
    with pytest.raises(InstructionError, match="max-local-epochs"):
        TrainOptions.from_config({**good, "local-epochs": 3}, max_local_epochs=2)


def test_first_non_finite_names_the_first_bad_float_key():
    tensors = {
        "a": torch.zeros(2),
        "n": torch.tensor([0, 1]),
        "b": torch.tensor([1.0, math.inf]),
        "c": torch.full((1,), math.nan),
    }
    assert first_non_finite(tensors) == "b"
    assert first_non_finite({"a": torch.zeros(2), "n": torch.tensor([3])}) is None


def test_the_site_never_calls_nnunets_unsafe_trainer_load_checkpoint():
    for path in (REPO / "src" / "flwr_nnunet").rglob("*.py"):
        text = path.read_text()
        assert "trainer.load_checkpoint(" not in text and "self.trainer.load_checkpoint(" not in text, path


# ------------------------------------------------------------ through the app
def _metadata(kind: str) -> Metadata:
    return Metadata(
        run_id=1,
        message_id="instruction",
        src_node_id=1,
        dst_node_id=2,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )


def _context(demo, results, run_id, **node_config):  # noqa: F811
    node = {
        "nnunet-preprocessed": str(demo.sites[0].nnunet_preprocessed),
        "nnunet-results": str(results),
        "site-name": "site-0",
        **node_config,
    }
    run_config = {"dataset": demo.dataset_name, "configuration": demo.configuration, "device": "cpu"}
    return Context(run_id=run_id, node_id=2, node_config=node, state=RecordDict(), run_config=run_config)


class Federation:
    """What the server sends this site: the global model, its alias map and the round's config."""

    def __init__(self, demo):  # noqa: F811
        self.weights = initial_weights(demo)
        folder = demo.server.preprocessed_dataset_folder
        self.plans_sha = plans_sha256(json.loads((folder / "nnUNetPlans.json").read_text()))
        torch.manual_seed(0)
        from flwr_nnunet.nnunet.networks import build_trainer_network

        dataset_json = json.loads((folder / "dataset.json").read_text())
        plans = json.loads((folder / "nnUNetPlans.json").read_text())
        self.alias_map = AliasMap.from_module(
            build_trainer_network(plans, dataset_json, demo.configuration, "nnUNetTrainer")
        ).to_json()

    def config(self, server_round, **overrides):
        config = {
            "server-round": server_round,
            "local-epochs": 1,
            "num-epochs": 4,
            "iterations-per-epoch": 1,
            "val-iterations-per-epoch": 1,
            "seed": 3,
            "plans-sha256": self.plans_sha,
            "alias-map": self.alias_map,
        }
        config.update(overrides)
        return ConfigRecord({k: v for k, v in config.items() if v is not None})

    def content(self, server_round, *, weights=None, **overrides):
        weights = self.weights if weights is None else weights
        return RecordDict({"arrays": to_array_record(weights), "config": self.config(server_round, **overrides)})


def send(kind, content, context):
    """An instruction of message type ``kind`` through ``client_app.app``, as Flower calls it; the reply."""
    return app(make_message(_metadata(kind), content=content), context)


def _state_bytes(spec):
    return spec.state_file.read_bytes(), spec.state_token_file.read_bytes()


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):  # noqa: F811
    """A site after one real tiny round through the app: its context, federation and state file."""
    federation = Federation(demo)
    run_id = next(_RUN_IDS)
    context = _context(demo, tmp_path_factory.mktemp("hardening") / "results", run_id)
    reply = send("train", federation.content(1), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    site = live_site(run_id, _spec(context))
    assert site.spec.state_file.is_file() and site.trainer.current_epoch == 1
    return context, federation, site


def _spec(context):
    from flwr_nnunet.apps.client import site_spec

    return site_spec(context.run_config, context.node_config, context.node_id)


def _npy(shape, descr="<f4", data=b"\0\0\0\0"):
    header = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data


def _with(weights, key, value):
    out = dict(weights)
    out[key] = value
    return out


def _arrays_with(federation, key, array):
    record = to_array_record(federation.weights)
    record[key] = array
    return record


def _malformed(federation):
    """(id, message type, content, extra node config, fragment the reason must hold)."""
    weights = federation.weights
    first, float_key = next(iter(weights)), next(k for k, t in weights.items() if t.is_floating_point())
    config = federation.config(2)
    garbage = Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=b"not an npy file")
    deep = Array(dtype="float32", shape=(1,) * 65, stype="numpy.ndarray", data=_npy((1,) * 65))
    nan = _with(weights, float_key, torch.full_like(weights[float_key], math.nan))
    inf = _with(weights, float_key, torch.full_like(weights[float_key], math.inf))
    return [
        (
            "undecodable-payload",
            "train",
            RecordDict({"arrays": _arrays_with(federation, first, garbage), "config": config}),
            {},
            "cannot be decoded",
        ),
        (
            "65-dimension-header",
            "train",
            RecordDict({"arrays": _arrays_with(federation, first, deep), "config": config}),
            {},
            "cannot be decoded",
        ),
        ("no-config", "train", RecordDict({"arrays": to_array_record(weights)}), {}, "no ConfigRecord 'config'"),
        ("no-arrays", "train", RecordDict({"config": config}), {}, "no ArrayRecord 'arrays'"),
        (
            "config-of-wrong-kind",
            "train",
            RecordDict({"arrays": to_array_record(weights), "config": MetricRecord({"server-round": 2})}),
            {},
            "no ConfigRecord 'config' (found MetricRecord)",
        ),
        ("evaluate-no-arrays", "evaluate", RecordDict({"config": config}), {}, "no ArrayRecord 'arrays'"),
        (
            "local-epochs-text",
            "train",
            federation.content(2, **{"local-epochs": "two"}),
            {},
            "'local-epochs' must be an integer",
        ),
        (
            "local-epochs-fraction",
            "train",
            federation.content(2, **{"local-epochs": 1.5}),
            {},
            "'local-epochs' must be an integer",
        ),
        (
            "local-keys-not-json",
            "train",
            federation.content(2, **{"local-keys": "[not json"}),
            {},
            "'local-keys' is not JSON",
        ),
        (
            "local-keys-not-a-list",
            "train",
            federation.content(2, **{"local-keys": '{"a": 1}'}),
            {},
            "'local-keys' must be the JSON text of a list",
        ),
        ("alias-map-not-text", "train", federation.content(2, **{"alias-map": 5}), {}, "'alias-map' must be text"),
        ("nan-weights", "train", federation.content(2, weights=nan), {}, f"not finite ({float_key!r}"),
        ("inf-weights", "train", federation.content(2, weights=inf), {}, f"not finite ({float_key!r}"),
        ("evaluate-nan-weights", "evaluate", federation.content(2, weights=nan), {}, f"not finite ({float_key!r}"),
        (
            "local-epochs-zero",
            "train",
            federation.content(2, **{"local-epochs": 0}),
            {},
            "'local-epochs' must be at least 1",
        ),
        (
            "local-epochs-negative",
            "train",
            federation.content(2, **{"local-epochs": -2}),
            {},
            "'local-epochs' must be at least 1",
        ),
        (
            "local-epochs-absurd",
            "train",
            federation.content(2, **{"local-epochs": 10**6}),
            {},
            "exceeds this site's bound of 100",
        ),
        (
            "local-epochs-over-node-bound",
            "train",
            federation.content(2, **{"local-epochs": 3}),
            {"max-local-epochs": 2},
            "bound of 2",
        ),
        ("no-server-round", "train", federation.content(2, **{"server-round": None}), {}, "no 'server-round'"),
        (
            "evaluate-no-server-round",
            "evaluate",
            federation.content(2, **{"server-round": None}),
            {},
            "no 'server-round'",
        ),
        (
            "server-round-zero",
            "train",
            federation.content(2, **{"server-round": 0}),
            {},
            "'server-round' must be at least 1",
        ),
        (
            "proximal-mu-nan",
            "train",
            federation.content(2, **{"proximal-mu": math.nan}),
            {},
            "'proximal-mu' must be a finite",
        ),
        (
            "missing-key",
            "train",
            RecordDict({"arrays": to_array_record({k: v for k, v in weights.items() if k != first}), "config": config}),
            {},
            "does not fit this site's network",
        ),
        (
            "wrong-shape",
            "train",
            federation.content(2, weights=_with(weights, float_key, torch.zeros(3, 3))),
            {},
            "does not fit this site's network",
        ),
        (
            "round-1-with-wrong-shape",
            "train",
            federation.content(1, weights=_with(weights, float_key, torch.zeros(3, 3))),
            {},
            "does not fit this site's network",
        ),
    ]


@pytest.mark.slow
def test_every_malformed_instruction_gets_an_error_reply_and_leaves_the_state_file_byte_identical(trained):
    context, federation, site = trained
    spec = site.spec
    before = _state_bytes(spec)
    rows = _malformed(federation)
    assert len({row[0] for row in rows}) == len(rows)
    for name, kind, content, node_config, fragment in rows:
        trainer = site.trainer
        row_context = context
        if node_config:
            row_context = _context_like(context, **node_config)
        reply = send(kind, content, row_context)
        assert reply.has_error(), name
        assert fragment in reply.error.reason, (name, reply.error.reason)
        assert "site-0" in reply.error.reason, name
        assert _state_bytes(spec) == before, name
        assert live_site(context.run_id, spec) is site and site.trainer is trainer, name  # not thrown away
        assert site.trainer.current_epoch == 1, name
    # The site still trains the next honest round from where it was.
    reply = send("train", federation.content(2), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert site.trainer.current_epoch == 2 and _state_bytes(spec) != before


def _context_like(context, **node_config):
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config={**context.node_config, **node_config},
        state=RecordDict(),
        run_config=context.run_config,
    )


@pytest.mark.slow
def test_training_that_goes_non_finite_is_refused_and_the_previous_state_is_kept(demo, tmp_path, monkeypatch):  # noqa: F811
    federation = Federation(demo)
    context = _context(demo, tmp_path / "results", next(_RUN_IDS))
    assert not send("train", federation.content(1), context).has_error()
    spec = _spec(context)
    before = _state_bytes(spec)
    original = Site._run_epoch

    def diverging_epoch(self):
        original(self)
        state = next(iter(self.trainer.optimizer.state.values()))
        state["momentum_buffer"].fill_(math.nan)  # the momentum of one parameter goes NaN

    monkeypatch.setattr(Site, "_run_epoch", diverging_epoch)
    reply = send("train", federation.content(2), context)
    assert reply.has_error() and "training went non-finite" in reply.error.reason, reply
    assert "optimizer state 0 momentum_buffer" in reply.error.reason
    assert _state_bytes(spec) == before
    site = live_site(context.run_id, spec)
    assert site.trainer is None  # the poisoned trainer is dropped

    monkeypatch.setattr(Site, "_run_epoch", original)
    reply = send("train", federation.content(2), context)  # the round again, honestly: from the kept state
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert site.trainer.current_epoch == 2
    momentum = [s["momentum_buffer"] for s in site.trainer.optimizer.state.values()]
    assert momentum and all(bool(torch.isfinite(m).all()) for m in momentum)


class _Marker:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


@pytest.mark.slow
def test_a_state_file_that_runs_code_on_unpickling_is_refused_and_never_unpickled(demo, tmp_path):  # noqa: F811
    federation = Federation(demo)
    context = _context(demo, tmp_path / "results", next(_RUN_IDS))
    assert not send("train", federation.content(1), context).has_error()
    spec = _spec(context)
    marker = tmp_path / "marker"
    state = torch.load(spec.state_file, weights_only=True)
    state["logging"] = _Marker(marker)  # e.g. someone with write access to the results folder
    torch.save(state, spec.state_file)
    hostile = spec.state_file.read_bytes()

    fresh = _context_like(context)
    fresh = Context(fresh.run_id + 500, fresh.node_id, fresh.node_config, RecordDict(), fresh.run_config)
    reply = send("train", federation.content(2), fresh)  # a fresh SuperNode process: rebuilds from the file
    assert reply.has_error(), "the hostile state file was accepted"
    assert "round state" in reply.error.reason and "not allowed to be unpickled" in reply.error.reason
    assert "remove it" in reply.error.reason
    assert not marker.exists()
    assert spec.state_file.read_bytes() == hostile


@pytest.mark.slow
def test_state_file_is_plain_tensors_and_python_values(trained):
    _, _, site = trained
    state = torch.load(site.spec.state_file, weights_only=True)  # no allow-list needed
    assert isinstance(state["_best_ema"], (float, type(None))) and isinstance(state["current_epoch"], int)
    assert not any(isinstance(v, np.generic) for values in state["logging"].values() for v in values)
