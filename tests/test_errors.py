"""One error root, one key-mismatch error, one canonical-JSON digest, one Dice from voxel counts."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import numpy as np
import pytest
import torch

import flwr_nnunet
from flwr_nnunet import AliasMap, FlwrNnUNetError, KeyMismatchError
from flwr_nnunet.core.reduce import check_updates, weighted_mean_
from flwr_nnunet.nnunet.digests import canonical_json_sha256, plans_sha256
from flwr_nnunet.nnunet.metrics import dice_from_counts, voxel_counts


def _project_exception_classes() -> dict[str, type]:
    """Every exception class defined in a module of the package, by qualified name."""
    found = {}
    for info in pkgutil.walk_packages(flwr_nnunet.__path__, prefix="flwr_nnunet."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ == module.__name__ and issubclass(obj, BaseException):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


EXCEPTION_CLASSES = _project_exception_classes()


def test_the_walk_finds_the_known_exception_classes():
    names = {cls.__name__ for cls in EXCEPTION_CLASSES.values()}
    known = {"KeyMismatchError", "AliasConflictError", "PartialOverlapError", "PayloadError", "CheckpointError"}
    assert known | {"RepairRefused", "SiteError", "ResumeError"} <= names


@pytest.mark.parametrize("name", sorted(EXCEPTION_CLASSES))
def test_every_project_exception_subclasses_the_root(name):
    assert issubclass(EXCEPTION_CLASSES[name], FlwrNnUNetError)


@pytest.mark.parametrize(
    ("name", "builtin"),
    [
        ("AliasConflictError", ValueError),
        ("PartialOverlapError", ValueError),
        ("PayloadError", ValueError),
        ("KeyMismatchError", KeyError),
        ("KeyMismatchError", ValueError),
        ("SiteError", RuntimeError),
        ("ResumeError", RuntimeError),
        ("CheckpointError", Exception),
    ],
)
def test_exceptions_keep_their_builtin_base(name, builtin):
    assert issubclass(getattr(flwr_nnunet, name), builtin)
    assert issubclass(getattr(flwr_nnunet, name), FlwrNnUNetError)


def test_key_mismatch_error_is_the_same_class_everywhere():
    from flwr_nnunet.core import aliasing
    from flwr_nnunet.errors import KeyMismatchError as root_one

    assert aliasing.KeyMismatchError is root_one is KeyMismatchError


def test_key_mismatch_from_aliasing_names_missing_and_unknown_keys():
    shared = torch.zeros(3)
    amap = AliasMap.from_state_dict({"a": shared, "a_alias": shared, "b": torch.ones(2)})
    with pytest.raises(KeyMismatchError) as caught:
        amap.collapse({"a": shared, "b": torch.ones(2), "zzz": torch.ones(1)})
    message = str(caught.value)
    assert "keys differ from the alias map" in message
    assert "missing 1 keys (first: ['a_alias'])" in message
    assert "1 unknown keys (first: ['zzz'])" in message
    assert (caught.value.missing, caught.value.unknown) == (("a_alias",), ("zzz",))


def test_key_mismatch_from_reduce_names_missing_and_unknown_keys():
    targets = {"a": torch.zeros(3), "b": torch.zeros(2)}
    before = {k: v.clone() for k, v in targets.items()}
    update = {"a": torch.ones(3), "c": torch.ones(1)}
    with pytest.raises(KeyMismatchError) as caught:
        weighted_mean_(targets, [update], [1.0])
    message = str(caught.value)
    assert message.startswith("update 0: keys differ from the targets")
    assert "missing 1 keys (first: ['b'])" in message
    assert "1 unknown keys (first: ['c'])" in message
    assert all(torch.equal(targets[k], before[k]) for k in targets)
    with pytest.raises(ValueError, match=r"update 1: keys differ"):  # still a ValueError for existing callers
        check_updates(targets, [dict(targets), update])


def test_key_mismatch_message_names_only_the_first_keys_and_a_fix():
    error = KeyMismatchError.from_keys(list("abcde"), [], what="reply", against="the global model", fix="use the plans")
    expected = "reply: keys differ from the global model: missing 5 keys (first: ['a', 'b', 'c']); use the plans"
    assert str(error) == expected
    assert error.missing == tuple("abcde")
    KeyMismatchError.check(["x", "y"], ["y", "x"], what="w", against="a")  # equal key sets: no error
    KeyMismatchError.check(["x", "opt"], ["x"], what="w", against="a", optional={"opt"})
    with pytest.raises(KeyMismatchError, match=r"1 unknown keys \(first: \['opt'\]\)"):
        KeyMismatchError.check(["x", "opt"], ["x"], what="w", against="a")


def test_canonical_json_sha256_ignores_key_order_and_sees_every_value():
    one = {"a": 1, "b": {"x": [1, 2], "y": "z"}}
    reordered = {"b": {"y": "z", "x": [1, 2]}, "a": 1}
    assert canonical_json_sha256(one) == canonical_json_sha256(reordered)
    assert canonical_json_sha256(one) != canonical_json_sha256({"a": 1, "b": {"x": [1, 3], "y": "z"}})
    assert canonical_json_sha256(one) != canonical_json_sha256({"a": 1, "b": {"x": [2, 1], "y": "z"}})
    assert plans_sha256(one) == canonical_json_sha256(one)
    # the digest stored in checkpoints and sent as plans-sha256 must not drift between versions
    assert plans_sha256({"b": 1, "a": [1, 2]}) == "94a786c3662bc7beeb598efa7d8cb58d7bea25d6c275ea9785a0230ff1f8c2ba"
    with pytest.raises(TypeError):
        canonical_json_sha256({"a": object()})
    assert canonical_json_sha256({"a": 1.5}, default=str) == canonical_json_sha256({"a": 1.5})


@pytest.mark.parametrize(
    ("tp", "fp", "fn", "dice"),
    [(1, 0, 0, 1.0), (1, 1, 1, 0.5), (3, 1, 1, 0.75), (0, 4, 0, 0.0), (0, 0, 2, 0.0), (0, 0, 0, 0.0)],
)
def test_dice_from_counts(tp, fp, fn, dice):
    assert dice_from_counts(tp, fp, fn) == dice


def test_voxel_counts():
    truth = np.array([[0, 1, 1], [2, 1, 0]])
    predicted = np.array([[1, 1, 0], [2, 1, 1]])
    assert voxel_counts(truth, predicted, 1).tolist() == [2.0, 2.0, 1.0]
    assert voxel_counts(truth, predicted, 2).tolist() == [1.0, 0.0, 0.0]
    assert dice_from_counts(*voxel_counts(truth, predicted, 1)) == pytest.approx(4 / 7)
