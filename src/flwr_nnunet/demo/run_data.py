"""The synthetic demo as a run's data (``make-demo=true``): checked against the run config, made on first use, planned
with :data:`~flwr_nnunet.demo.data.DEMO_PLANNING`.

``server_app.py`` plugs :data:`DEMO_RUN_DATA` into :func:`flwr_nnunet.apps.server.run_server`, which knows only
the :class:`~flwr_nnunet.apps.server.RunData` it is given.
"""

from __future__ import annotations

from logging import INFO

from flwr.supercore import log

from flwr_nnunet.apps.config_errors import ServerConfigError
from flwr_nnunet.apps.planning_phase import PlanningOptions
from flwr_nnunet.apps.run_config import RunSettings

__all__ = ["DEMO_DATASET", "DEMO_RUN_DATA", "DemoRunData", "check_demo_settings"]

DEMO_DATASET = "Dataset987_FedDemo"
_DEMO_CONFIGURATION = {False: "2d", True: "3d_fullres"}


class DemoRunData:
    """The :class:`~flwr_nnunet.apps.server.RunData` of the synthetic demo."""

    def prepare(self, settings: RunSettings) -> None:
        """Make the demo's raw data under ``data-root`` unless a demo is there; check it fits the run config.

        Only what hospitals hold is made (each site's raw dataset and split): the run's planning phase plans it.

        Raises
        ------
        ServerConfigError
            If the run config does not name the demo's dataset and configuration (before any data are made), the
            demo under ``data-root`` is not the dataset / configuration the run config names, or ``data-root``
            holds other data.
        """
        from flwr_nnunet.demo.data import load_demo_dataset, make_demo_dataset

        check_demo_settings(settings)
        try:
            demo = load_demo_dataset(settings.data_root)
        except FileNotFoundError:
            log(INFO, "flwr-nnunet: making the demo's raw data under %s (first use)", settings.data_root)
            try:
                demo = make_demo_dataset(
                    settings.data_root, num_sites=settings.demo_sites, dims=3 if settings.demo_3d else 2, planned=False
                )
            except ValueError as error:
                raise ServerConfigError(f"make-demo=true: {error}") from None
        wanted = (settings.dataset, settings.configuration)
        if (demo.dataset_name, demo.configuration) != wanted:
            raise ServerConfigError(
                f"the demo under {demo.root} is {demo.dataset_name} / {demo.configuration} but the run config asks "
                f"for {wanted[0]} / {wanted[1]}: set run-config dataset / configuration to match, or point data-root "
                "at another folder (the demo is made there)"
            )

    def planning_options(self, settings: RunSettings) -> PlanningOptions:
        """The demo's planning options (narrow networks for a CPU), whatever the run config's plans-* keys say."""
        from flwr_nnunet.demo.data import DEMO_PLANNING

        return DEMO_PLANNING


DEMO_RUN_DATA = DemoRunData()
"""What ``server_app.py`` passes to :func:`~flwr_nnunet.apps.server.run_server`."""


def check_demo_settings(settings: RunSettings) -> None:
    """The run config must name the demo's dataset and its configuration (2d or, 3D, 3d_fullres).

    Raises
    ------
    ServerConfigError
        Naming the key to change, before any data are made.
    """
    demo_configuration = _DEMO_CONFIGURATION[settings.demo_3d]
    if settings.configuration != demo_configuration:
        if settings.demo_3d:
            fix = "set configuration='3d_fullres' (as configs/demo-3d.toml does), or demo-3d=false for the 2D demo"
        elif settings.configuration == _DEMO_CONFIGURATION[True]:
            fix = "set demo-3d=true for the 3D demo (flwr run . --run-config configs/demo-3d.toml)"
        else:
            fix = "set configuration='2d', or demo-3d=true with configuration='3d_fullres' for the 3D demo"
        kind = "3D" if settings.demo_3d else "2D"
        raise ServerConfigError(
            f"configuration {settings.configuration!r} does not fit the {kind} demo (make-demo=true, "
            f"demo-3d={str(settings.demo_3d).lower()}), which is planned for {demo_configuration!r} only: {fix}"
        )
    if settings.dataset != DEMO_DATASET:
        raise ServerConfigError(
            f"dataset {settings.dataset!r} is not the demo's ({DEMO_DATASET}), and make-demo=true makes only the "
            f"demo: for your own dataset set make-demo=false and data-root to the folder with each site's "
            f"site-K/nnUNet_raw/{settings.dataset} (see the README, 'Your own nnU-Net datasets'), or set "
            f"dataset='{DEMO_DATASET}'"
        )
