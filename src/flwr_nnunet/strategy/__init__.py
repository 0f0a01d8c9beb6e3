"""The server side of a round: the global model, reply checks, the alias-aware strategies, the round loop."""
