"""FedProx and MR-MTL at a site: the proximal term added to nnU-Net's training loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["ProximalLoss", "proximal_term"]


def proximal_term(parameters: Mapping[str, nn.Parameter], anchors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``sum ||p - anchor||^2`` over the parameters (FedProx's proximal term, without ``mu / 2``)."""
    return sum(((parameters[key] - anchor) ** 2).sum() for key, anchor in anchors.items())


class ProximalLoss:
    """The trainer's loss plus ``mu / 2 * ||w - anchor||^2`` over the trainable parameters.

    ``anchors`` (parameter name -> tensor) default to the parameters' values now (FedProx: the global model
    just loaded); MR-MTL passes the global model while the network holds the site's personal model.
    Parameters without an anchor (groups kept local) are not pulled.
    """

    def __init__(
        self,
        loss: Any,
        parameters: Mapping[str, nn.Parameter],
        mu: float,
        anchors: Mapping[str, torch.Tensor] | None = None,
    ):
        self.loss = loss
        self.parameters = dict(parameters)
        trainable = {key: p for key, p in self.parameters.items() if p.requires_grad}
        if anchors is None:
            self.anchors = {key: p.detach().clone() for key, p in trainable.items()}
        else:
            self.anchors = {
                key: anchors[key].detach().to(p.device, p.dtype, copy=True)
                for key, p in trainable.items()
                if key in anchors
            }
        self.mu = mu

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        return self.loss(output, target) + 0.5 * self.mu * proximal_term(self.parameters, self.anchors)
