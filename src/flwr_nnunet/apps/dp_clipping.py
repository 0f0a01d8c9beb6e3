"""The ClientApp's DP mod: Flower's client-side clipping of a site's update where the run asks for it.

It runs in every ClientApp process, around the site's answer from its warm worker
or its own process, and needs only Flower (numpy), never torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CLIENT_DP_MODES", "dp_clipping_mod"]

CLIENT_DP_MODES = ("client-fixed", "client-adaptive")
"""Run-config ``dp`` values that clip each site's update on the site (Flower's client-side clipping mods)."""


def dp_clipping_mod(message: Any, context: Any, call_next: Any) -> Any:
    """ClientApp mod: Flower's client-side DP clipping of training replies when run-config ``dp`` asks for it.

    With ``dp = "client-fixed"`` / ``"client-adaptive"`` the server's DP wrapper
    sends a clipping norm and each site must clip its update before replying
    (``fixedclipping_mod`` / ``adaptiveclipping_mod``); the update norm then
    counts each shared tensor once, since the records are canonical. Other
    messages and runs pass through unchanged.
    """
    from flwr.app import MessageType
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    mode = str(context.run_config.get("dp", "") or "")
    if message.metadata.message_type != MessageType.TRAIN or mode not in CLIENT_DP_MODES:
        return call_next(message, context)
    mod = fixedclipping_mod if mode == "client-fixed" else adaptiveclipping_mod
    return mod(message, context, call_next)  # Flower's mods answer a malformed instruction with an error reply
