"""``flwr-nnunet inspect`` and ``repair``: checkpoints bloated or diverged by per-key arithmetic."""
