"""Which site hurts the federation: evidence per round from what the replies carry, and the flag it leads to.

What the evidence is read from: each round's accepted replies and the planning phase's survey (nothing more is
asked of the sites).

``labels``
    An evaluation reply's ``label-confusion`` holds the global model's predictions against the site's own
    validation labels as voxel counts, from which the one-to-one matching of the site's labels to the model's
    labels with the highest mean Dice follows (:func:`~flwr_nnunet.nnunet.metrics.best_label_matching`). The
    federation's convention is the matching that more than half of the round's sites fit best, once the model
    fits them with a median mean Dice of 0.5 (before that, in round 1 say, the model may confuse labels at
    honest sites: no evidence that round, for or against anyone). A site whose best matching is another one, and beats the federation's by at least
    ``label_margin`` in mean Dice at that site, holds its labels another way (labels 1 and 2 swapped, say).
    Comparing sites with each other, not with the model, keeps this true while the model is still confused
    by the site: honest sites, whatever their images, fit one model alike.
``update`` (measured, not used for the flag)
    In a batch round of three or more training replies, each site's update of the segmentation heads
    (``seg_layers``, where the labels' meaning lives: a few kilobytes, so this costs the round nothing) is
    compared with the mean of the other sites' update directions; the cosine goes to the history. It is no
    evidence: on an honest federation it falls below zero once the sites near their own optima (the 3 clean
    demo sites, rounds 6 to 10: -0.13 to -0.96), as it does at a site with other labels.
``label volumes`` (before training)
    The planning phase's label-convention check (:mod:`flwr_nnunet.nnunet.label_convention`) names a site whose
    label volumes reverse the order every other site agrees on; the run flags it before round 1
    (:meth:`SiteDiagnostics.flag_before_training`).

A site is flagged once the ``labels`` evidence holds in ``patience`` consecutive rounds in which there was a
convention, or at once by the label-volume check; the flag is logged once, as one line naming the site, its node
and the evidence, and it stays for the run. A flag changes nothing by itself: the strategy's ``flagged_weight`` (run-config ``flagged-weight``)
decides whether flagged sites are down-weighted or excluded. The flags go into every checkpoint's strategy state,
so a resumed run keeps them; evidence short of a flag starts afresh.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.supercore import log

from flwr_nnunet.nnunet.metrics import LabelMatching, best_label_matching

__all__ = [
    "Evidence",
    "SiteDiagnostics",
    "convention",
    "cosines_to_others",
    "is_segmentation_head",
    "label_evidence",
    "label_matchings",
    "update_gram",
]


def is_segmentation_head(key: str) -> bool:
    """Whether a canonical key belongs to nnU-Net's segmentation heads (``decoder.seg_layers``)."""
    return ".seg_layers." in f".{key}"


_CHUNK = 1 << 20
"""Elements of one tensor stacked at a time for the updates' Gram matrix."""


@dataclass(frozen=True)
class Evidence:
    """One round's evidence against one site: its kind (``labels`` or ``update``), the round and one line."""

    kind: str
    server_round: int
    text: str


def label_matchings(confusions: Mapping[int, Sequence[float]]) -> dict[int, LabelMatching]:
    """Each site's :func:`~flwr_nnunet.nnunet.metrics.best_label_matching` of its flattened ``label-confusion``
    (sites whose counts are not a flattened square matrix of the round's size are left out)."""
    matchings = {}
    for node, confusion in confusions.items():
        counts = np.asarray(confusion, dtype=np.float64)
        size = math.isqrt(counts.size)
        if size >= 2 and size * size == counts.size:
            try:
                matchings[node] = best_label_matching(counts.reshape(size, size))
            except ValueError:
                continue
    return matchings


def convention(matchings: Mapping[int, LabelMatching], min_dice: float = 0.5) -> tuple[int, ...] | None:
    """The matching more than half of the sites fit best, when the model fits those sites with a median mean Dice
    of at least ``min_dice`` under it (a model that has learnt too little to tell); else None."""
    votes = Counter(m.permutation for m in matchings.values())
    if not votes:
        return None
    permutation, count = votes.most_common(1)[0]
    if 2 * count <= len(matchings):
        return None
    fits = [m.dice_matched for m in matchings.values() if m.permutation == permutation]
    return permutation if float(np.median(fits)) >= min_dice else None


def label_evidence(matching: LabelMatching, federation: Sequence[int], others: int, margin: float) -> str | None:
    """The evidence line when a site's best matching is not the ``federation``'s and beats it by ``margin``."""
    if tuple(matching.permutation) == tuple(federation):
        return None
    theirs = matching.mean_dice(federation)
    if matching.dice_matched - theirs < margin:
        return None
    pairs = ", ".join(f"its label {r} fits the model's label {p}" for r, p in enumerate(matching.permutation, 1))
    return (
        f"its validation labels fit the global model only matched another way than at the other {others} "
        f"site(s) ({pairs}): mean Dice {matching.dice_matched:.3f} so, {theirs:.3f} matched as at the others"
    )


@torch.no_grad()
def update_gram(
    updates: Sequence[Mapping[str, torch.Tensor]],
    reference: Mapping[str, torch.Tensor],
    keys: Callable[[str], bool] = lambda key: True,
) -> np.ndarray:
    """The Gram matrix ``G[i, j] = <u_i - reference, u_j - reference>`` of the updates, over the floating-point
    tensors of ``reference`` whose key ``keys`` accepts (float64 sums of float32 chunk products)."""
    gram = np.zeros((len(updates), len(updates)))
    for key, base in reference.items():
        if not base.is_floating_point() or not keys(key):
            continue
        flat = base.detach().reshape(-1).float()
        for start in range(0, flat.numel(), _CHUNK):
            part = flat[start : start + _CHUNK]
            deltas = torch.stack([u[key].detach().reshape(-1)[start : start + _CHUNK].float() - part for u in updates])
            gram += (deltas @ deltas.T).double().numpy()
    return gram


def cosines_to_others(gram: np.ndarray) -> list[float]:
    """Each update's cosine with the mean of the other updates' directions (unit vectors: every site one voice,
    whatever its step size), from :func:`update_gram`; 0 where a norm is 0."""
    gram = np.asarray(gram, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    gram = gram * scale[:, None] * scale[None, :]
    total = gram.sum()
    cosines = []
    for i in range(len(gram)):
        own, with_all = gram[i, i], gram[i].sum()
        others = total - 2 * with_all + own
        norm = np.sqrt(max(own, 0.0) * max(others, 0.0))
        cosines.append(float((with_all - own) / norm) if norm > 0 else 0.0)
    return cosines


class SiteDiagnostics:
    """Per-round evidence against each site and the sites flagged so far (see the module's description).

    Parameters
    ----------
    patience
        Consecutive rounds (in which the site replied) one kind of evidence must hold before the site is flagged.
    label_margin
        How much the best re-matching of a site's labels must raise its mean validation Dice to count.
    """

    def __init__(self, *, patience: int = 2, label_margin: float = 0.1) -> None:
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.patience = patience
        self.label_margin = label_margin
        self.names: dict[int, str] = {}
        self.flags: dict[int, list[Evidence]] = {}
        self.measured: dict[int, dict[str, dict[str, Any]]] = {}
        self._streaks: dict[tuple[int, str], list[Evidence]] = {}

    def name(self, node: int) -> str:
        """The site's name as its replies give it (``node <id>`` until one did)."""
        return self.names.get(node, f"node {node}")

    def is_flagged(self, node: int) -> bool:
        """Whether the node's site has been flagged in this run."""
        return node in self.flags

    def _remember_name(self, reply: Any) -> None:
        about = reply.message.content.config_records.get("config")
        name = about.get("site-name") if about is not None else None
        if isinstance(name, str) and name:
            self.names[reply.node_id] = name[:100]

    def _measure(self, server_round: int, node: int, kind: str, values: Any) -> None:
        self.measured.setdefault(server_round, {}).setdefault(self.name(node), {})[kind] = values

    def _weigh(self, node: int, evidence: Evidence | None, kind: str, patience: int | None = None) -> None:
        """Extend or end the node's streak of ``kind``; flag the node (one log line) when it reaches ``patience``
        (default :attr:`patience`)."""
        streak = self._streaks.setdefault((node, kind), [])
        if evidence is None:
            streak.clear()
            return
        streak.append(evidence)
        if len(streak) >= (patience or self.patience) and node not in self.flags:
            self.flags[node] = list(streak)
            first, last = streak[0].server_round, streak[-1].server_round
            rounds = "before training" if last == 0 else f"in rounds {first}-{last}"
            log(
                WARNING,
                "flwr-nnunet: site %s (node %d) disagrees with the federation %s: %s",
                self.name(node),
                node,
                rounds,
                evidence.text,
            )

    def note_evaluate(self, server_round: int, accepted: Sequence[Any]) -> None:
        """The ``labels`` evidence of one evaluation round's accepted replies (those with ``label-confusion``)."""
        confusions = {}
        for reply in accepted:
            self._remember_name(reply)
            if isinstance(reply.metrics.get("label-confusion"), list):
                confusions[reply.node_id] = reply.metrics["label-confusion"]
        matchings = label_matchings(confusions)
        federation = convention(matchings)
        for node, matching in matchings.items():
            measured = {
                "as-labelled": matching.dice_as_labelled,
                "matched": matching.dice_matched,
                "permutation": list(matching.permutation),
                "gain-over-convention": None
                if federation is None
                else matching.dice_matched - matching.mean_dice(federation),
            }
            self._measure(server_round, node, "labels", measured)
        if federation is None:
            return  # no convention this round: neither for nor against any site
        for node, matching in matchings.items():
            line = label_evidence(matching, federation, len(matchings) - 1, self.label_margin)
            self._weigh(node, None if line is None else Evidence("labels", server_round, line), "labels")

    def note_train(self, server_round: int, accepted: Sequence[Any], reference: Mapping[str, torch.Tensor]) -> None:
        """Measure the ``update`` cosine of one batch training round for the history: each reply's segmentation
        heads against ``reference``'s (the global model before this round's aggregation). Needs three replies or
        more."""
        for reply in accepted:
            self._remember_name(reply)
        if len(accepted) < 3:
            return
        gram = update_gram([reply.tensors for reply in accepted], reference, is_segmentation_head)
        for reply, cosine in zip(accepted, cosines_to_others(gram)):
            self._measure(server_round, reply.node_id, "head-cosine", cosine)

    def flag_before_training(self, node: int, name: str, text: str) -> None:
        """Flag ``node`` (site ``name``) before round 1 on the planning phase's label-volume evidence ``text``."""
        self.names.setdefault(node, name)
        self._weigh(node, Evidence("label volumes", 0, text), "label volumes", patience=1)

    def state(self) -> dict[str, Any]:
        """The flags and the sites' names, for a checkpoint (plain values)."""
        return {
            "names": {str(node): name for node, name in self.names.items()},
            "flags": {
                str(node): [[e.kind, e.server_round, e.text] for e in evidence] for node, evidence in self.flags.items()
            },
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state` returned (a resumed run keeps its flags; entries it cannot read are skipped)."""
        for node, name in dict(state.get("names", {})).items():
            if str(node).lstrip("-").isdigit() and isinstance(name, str):
                self.names[int(node)] = name
        for node, evidence in dict(state.get("flags", {})).items():
            if str(node).lstrip("-").isdigit() and isinstance(evidence, list):
                self.flags[int(node)] = [
                    Evidence(str(kind), int(server_round), str(text)) for kind, server_round, text in evidence
                ]

    def report(self, server_round: int) -> dict[str, Any]:
        """What the round measured per site, and each site flagged so far with the round that completed its
        evidence (0: before training), for the run's history."""
        return {
            "sites": self.measured.get(server_round, {}),
            "flagged": {self.name(node): evidence[-1].server_round for node, evidence in sorted(self.flags.items())},
        }
