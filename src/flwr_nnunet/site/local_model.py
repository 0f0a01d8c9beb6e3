"""A site's local model after its last round, read from its round state: what cross-site evaluation shares.

The round state (:mod:`flwr_nnunet.site.trainer_state`) holds the network as the site's last training left it,
before the next global model was loaded: the site's local model. It is read with the project's safe loader and
collapsed to its alias groups, so it crosses the network once per shared tensor like any update.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from flwr_nnunet.core.aliasing import AliasMap
from flwr_nnunet.nnunet.checkpoint_io import CheckpointError, load_checkpoint
from flwr_nnunet.site.spec import SiteError, SiteSpec

__all__ = ["local_model"]


def local_model(spec: SiteSpec) -> OrderedDict[str, torch.Tensor]:
    """The site's network after its last local training, canonical (one tensor per alias group).

    Raises
    ------
    SiteError
        If the site has no round state (it has not trained in this run), or the state is not a checkpoint.
    """
    if not spec.state_file.is_file():
        raise SiteError(f"{spec.name}: no local model: the site has not trained in this run ({spec.state_file})")
    try:
        weights = load_checkpoint(spec.state_file)["network_weights"]
    except (CheckpointError, KeyError, TypeError) as error:
        raise SiteError(f"{spec.name}: its round state {spec.state_file} holds no network: {error}") from None
    return OrderedDict(AliasMap.from_state_dict(weights).collapse(weights))
