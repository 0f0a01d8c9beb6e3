"""The core: alias groups, the canonical record codec and the in-place reducers (torch and ``flwr.app`` only)."""
