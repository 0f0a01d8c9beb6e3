"""Flower ClientApp of flwr-nnunet: each node is one site training nnU-Net on its own data.

A ``train`` or ``evaluate`` message goes, unread, to the site's warm worker where one takes it: this process then
imports only Flower. Everything else is answered here, torch and nnU-Net imported on first use.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flwr_nnunet.apps.dp_clipping import dp_clipping_mod
from flwr_nnunet.apps.forked_children import default_signals_in_forked_children
from flwr_nnunet.apps.packed_messages import packed_arrays_mod
from flwr_nnunet.apps.warm_forwarding import forwarded

default_signals_in_forked_children()  # nnU-Net's augmentation workers must not report the ClientApp's task
app = ClientApp(mods=[packed_arrays_mod, dp_clipping_mod])  # the first is the outermost: DP clips unpacked arrays


def _answered(msg: Message, context: Context, *, train: bool) -> Message:
    """The warm worker's reply where it takes the message, else this process's."""
    reply = forwarded(msg, context)
    if reply is not None:
        return reply
    from flwr_nnunet.apps.client import handle_message

    return handle_message(msg, context, train=train)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global model, train the configured local epochs, reply with the weights and metrics."""
    return _answered(msg, context, train=True)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Dice of the global model on the site's validation cases."""
    return _answered(msg, context, train=False)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Federated planning: the site's aggregate statistics, or the federation's plans installed and applied."""
    from flwr_nnunet.apps.client import handle_query

    return handle_query(msg, context)


@app.query("ensemble")
def ensemble(msg: Message, context: Context) -> Message:
    """Model selection: the site's ensemble of two configurations' cross-validation predictions, counts only."""
    from flwr_nnunet.apps.client import handle_ensemble_query

    return handle_ensemble_query(msg, context)


@app.query("local_model")
def local_model(msg: Message, context: Context) -> Message:
    """Cross-site evaluation (opt-in): the site's model after its last round."""
    from flwr_nnunet.apps.client import handle_local_model_query

    return handle_local_model_query(msg, context)
