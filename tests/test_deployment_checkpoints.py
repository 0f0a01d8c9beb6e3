"""A server killed while it writes its checkpoint: the model folder always holds an intact one to resume from.

A real process writes ``checkpoint_latest.pth`` round after round (16 MB each, atomically: temp file, fsync,
rename, the old latest renamed to previous) and is SIGKILLed at a random moment, several times. After every
kill ``checkpoint_latest.pth`` either loads and verifies or is absent (killed between the two renames), and
:meth:`NnUNetModelFolder.load_latest` returns an intact checkpoint no older than the last completed write. The
temp files the killed writers left are removed when a server starts on the folder again; a live writer's stay.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from strategy_support import tiny_network

from flwr_nnunet.nnunet.checkpoint_io import temp_path
from flwr_nnunet.nnunet.model_folder import STATE_KEY, NnUNetModelFolder
from flwr_nnunet.strategy.checkpoints import RunCheckpoints
from flwr_nnunet.strategy.global_model import GlobalModel

KILLS = 4
WRITER = """
import sys
import torch
from flwr_nnunet.nnunet.digests import tensors_sha256
from flwr_nnunet.nnunet.model_folder import NnUNetModelFolder

folder = NnUNetModelFolder(sys.argv[1], {"configurations": {"2d": {}}}, {}, None, "2d")
server_round = int(sys.argv[2])
while True:
    server_round += 1
    weights = {"w": torch.full((4_000_000,), float(server_round))}
    folder.save_checkpoint("latest", weights, {"server_round": server_round, "weights_sha256": tensors_sha256(weights)})
    print(server_round, flush=True)
"""


def folder_at(path: Path) -> NnUNetModelFolder:
    return NnUNetModelFolder(path, {"configurations": {"2d": {}}}, {}, None, "2d")


@pytest.mark.slow
def test_killing_the_writer_never_leaves_a_latest_checkpoint_that_fails_to_load(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    folder = folder_at(tmp_path / "model")
    rng = random.Random(0)
    completed, mid_write = 0, 0
    for _ in range(KILLS):
        log = tmp_path / "writer.log"
        with log.open("w") as out:
            writer = subprocess.Popen([sys.executable, str(script), str(folder.path), str(completed)], stdout=out)
        try:
            deadline = time.monotonic() + 120
            while not log.read_text().split() and time.monotonic() < deadline:  # at least one write completed
                assert writer.poll() is None, f"the writer exited with {writer.returncode}"
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.8))
        finally:
            writer.kill()
            writer.wait(timeout=30)
        written = [int(line) for line in log.read_text().split()]
        assert written, "the writer completed no checkpoint"
        completed = written[-1]
        mid_write += any(folder.fold_dir.glob(".*.tmp"))

        latest = folder.checkpoint_path("latest")
        if latest.exists():
            folder.load_checkpoint(latest)  # raises CheckpointError if damaged
        found = folder.load_latest()
        assert found is not None
        checkpoint, path = found
        assert checkpoint[STATE_KEY]["server_round"] >= completed, (path, completed)
        assert float(checkpoint["network_weights"]["w"][0]) == checkpoint[STATE_KEY]["server_round"]
        completed = checkpoint[STATE_KEY]["server_round"]
    assert mid_write >= 1, f"none of the {KILLS} kills interrupted a write: the test shows nothing"

    orphans = sorted(folder.fold_dir.glob(".*.tmp"))
    assert orphans, "the killed writers left no temp file: the clean-up below shows nothing"
    live = temp_path(folder.checkpoint_path("best"))  # this process's: a write in progress
    live.write_bytes(b"being written")
    other = folder.fold_dir / ".notes.tmp"
    other.write_bytes(b"not the project's pattern")
    RunCheckpoints(GlobalModel(tiny_network()), folder, plans_sha256=None).prepare_folder()  # a server starts
    assert sorted(folder.fold_dir.glob(".*.tmp")) == sorted([live, other])
    assert folder.load_latest() is not None
