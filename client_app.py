"""Flower ClientApp of flwr-nnunet: each node is one site training nnU-Net on its own data."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flwr_nnunet.apps.client import (
    dp_clipping_mod,
    handle_ensemble_query,
    handle_local_model_query,
    handle_message,
    handle_query,
)
from flwr_nnunet.apps.forked_children import default_signals_in_forked_children

default_signals_in_forked_children()  # nnU-Net's augmentation workers must not report the ClientApp's task
app = ClientApp(mods=[dp_clipping_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global model, train the configured local epochs, reply with the weights and metrics."""
    return handle_message(msg, context, train=True)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Dice of the global model on the site's validation cases."""
    return handle_message(msg, context, train=False)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Federated planning: the site's aggregate statistics, or the federation's plans installed and applied."""
    return handle_query(msg, context)


@app.query("ensemble")
def ensemble(msg: Message, context: Context) -> Message:
    """Model selection: the site's ensemble of two configurations' cross-validation predictions, counts only."""
    return handle_ensemble_query(msg, context)


@app.query("local_model")
def local_model(msg: Message, context: Context) -> Message:
    """Cross-site evaluation (opt-in): the site's model after its last round."""
    return handle_local_model_query(msg, context)
