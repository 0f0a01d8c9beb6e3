"""Flower ServerApp of flwr-nnunet: federated nnU-Net training (run config: ``[tool.flwr.app.config]``)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flwr_nnunet.apps.server import run_server
from flwr_nnunet.demo.run_data import DEMO_RUN_DATA

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Make the demo's raw data if asked, plan with the sites, build the global network and strategy, run the rounds."""
    run_server(grid, context, data=DEMO_RUN_DATA)
