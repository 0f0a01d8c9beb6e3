"""Shared pieces of the strategy tests: tiny nnU-Net plans, reply Messages as Flower builds them, an in-process grid."""

from __future__ import annotations

import copy
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from flwr_nnunet import AliasMap, from_array_record, to_array_record
from flwr_nnunet.nnunet.networks import STOCK_ARCHITECTURES, build_network

RUN_ID = 7
SERVER_NODE = 1
_message_ids = itertools.count()


def tiny_architecture(norm: str = "instance", features: tuple[int, ...] = (4, 8, 16)) -> dict:
    """A 2d PlainConvUNet architecture entry with len(features) stages (as in nnU-Net plans)."""
    arch = copy.deepcopy(STOCK_ARCHITECTURES["2d PlainConvUNet"])
    n = len(features)
    kwargs = arch["arch_kwargs"]
    kwargs.update(
        n_stages=n,
        features_per_stage=list(features),
        kernel_sizes=[[3, 3]] * n,
        strides=[[1, 1]] + [[2, 2]] * (n - 1),
        n_conv_per_stage=[2] * n,
        n_conv_per_stage_decoder=[2] * (n - 1),
    )
    if norm == "batch":
        kwargs["norm_op"] = "torch.nn.modules.batchnorm.BatchNorm2d"
    return arch


def tiny_plans(
    norm: str = "instance", dataset_name: str = "Dataset901_Toy", features: tuple[int, ...] = (4, 8, 16)
) -> dict:
    """Minimal nnU-Net 2.8 plans for 32x32 single-channel 2d images and a tiny architecture."""
    resample = "resample_data_or_seg_to_shape"
    kwargs = {"order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [999.0, 1.0, 1.0],
        "original_median_shape_after_transp": [1, 32, 32],
        "image_reader_writer": "NaturalImage2DIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "2d": {
                "data_identifier": "nnUNetPlans_2d",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [32, 32],
                "median_image_size_in_voxels": [32.0, 32.0],
                "spacing": [1.0, 1.0],
                "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": resample,
                "resampling_fn_seg": resample,
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, **kwargs},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, **kwargs},
                "resampling_fn_probabilities": resample,
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, **kwargs},
                "architecture": tiny_architecture(norm, features),
                "batch_dice": True,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 1.0,
                "mean": 0.5,
                "median": 0.5,
                "min": 0.0,
                "percentile_00_5": 0.0,
                "percentile_99_5": 1.0,
                "std": 0.2,
            }
        },
    }


DATASET_JSON = {
    "channel_names": {"0": "gray"},
    "labels": {"background": 0, "object": 1},
    "numTraining": 4,
    "file_ending": ".png",
}
FINGERPRINT = {"spacings": [[999.0, 1.0, 1.0]] * 4, "shapes_after_crop": [[1, 32, 32]] * 4}


def tiny_network(norm: str = "instance", seed: int = 0) -> torch.nn.Module:
    """The network nnU-Net builds from :func:`tiny_plans` (2 output channels)."""
    torch.manual_seed(seed)
    return build_network(tiny_architecture(norm), 1, 2)


def canonical(network: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The network's canonical tensors (views of its parameters)."""
    return AliasMap.from_module(network).collapse(network.state_dict())


def perturbed(tensors: Mapping[str, torch.Tensor], seed: int, scale: float = 0.1) -> OrderedDict[str, torch.Tensor]:
    """New tensors: floating ones plus seeded noise, integer ones plus the seed."""
    generator = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for key, t in tensors.items():
        if t.is_floating_point():
            out[key] = t + scale * torch.randn(t.shape, generator=generator, dtype=t.dtype)
        else:
            out[key] = t + seed
    return out


def metadata(
    node_id: int, message_type: str = MessageType.TRAIN, group: int | str = 1, reply_to: str = "instruction"
) -> Metadata:
    """Reply metadata as the SuperLink stamps it (from ``node_id`` to the ServerApp, answering ``reply_to``)."""
    return Metadata(
        run_id=RUN_ID,
        message_id=f"reply-{next(_message_ids)}",
        src_node_id=node_id,
        dst_node_id=SERVER_NODE,
        reply_to_message_id=reply_to,
        group_id=str(group),
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )


def reply(
    node_id: int,
    arrays: Mapping[str, torch.Tensor] | ArrayRecord | None = None,
    num_examples: object = 10,
    *,
    metrics: Mapping[str, object] | None = None,
    config: Mapping[str, object] | None = None,
    message_type: str = MessageType.TRAIN,
) -> Message:
    """A reply Message as a ClientApp sends it: ``arrays`` + ``metrics`` (+ optional ``config``)."""
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = arrays if isinstance(arrays, ArrayRecord) else to_array_record(arrays)
    values = {} if num_examples is None else {"num-examples": num_examples}
    content["metrics"] = MetricRecord({**values, **(metrics or {})})
    if config:
        content["config"] = ConfigRecord(dict(config))
    return make_message(metadata(node_id, message_type), content=content)


def evaluate_reply(node_id: int, dice: float, num_examples: int = 4) -> Message:
    """An evaluation reply with ``num-examples`` and ``dice``."""
    return reply(node_id, None, num_examples, metrics={"dice": dice}, message_type=MessageType.EVALUATE)


def set_task_identity() -> None:
    """Let ``Message(...)`` be built outside a running ServerApp (as Flower's runtime sets it)."""
    TaskIdentity.run_id = RUN_ID
    TaskIdentity.node_id = SERVER_NODE
    TaskIdentity.task_id = 1


Handler = Callable[[int, Message], RecordDict]


class InProcessGrid(Grid):
    """What every in-process Grid shares: one run, the nodes ``node_ids``, plain instruction Messages."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)

    def set_run(self, run) -> None:
        """Unused: there is one run."""

    @property
    def run(self):
        """Unused: there is one run."""
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        """Build an instruction Message."""
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """The connected nodes."""
        return list(self.node_ids)


class LoopbackGrid(InProcessGrid):
    """An in-process Grid: each instruction is answered at once by ``handler(node_id, message)``."""

    def __init__(self, node_ids: Iterable[int], handler: Handler) -> None:
        super().__init__(node_ids)
        self.handler = handler
        self.sent: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Record the messages."""
        self.sent.extend(messages)
        return [str(i) for i, _ in enumerate(self.sent)]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Not used: replies come from send_and_receive."""
        return []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Answer every message through the handler, as nodes would."""
        replies = []
        for message in messages:
            self.sent.append(message)
            node = message.metadata.dst_node_id
            content = self.handler(node, message)
            replies.append(make_message(metadata(node, message.metadata.message_type), content=content))
        return replies


def received(message: Message) -> OrderedDict[str, torch.Tensor]:
    """The canonical tensors an instruction carries (copies, writable)."""
    return OrderedDict((k, v.clone()) for k, v in from_array_record(message.content["arrays"]).items())


class ScriptedGrid(InProcessGrid):
    """A grid with push/pull: each node's reply becomes pullable ``delays[node]`` seconds after the push, and at
    most ``per_pull`` replies are handed over per pull, in ``order`` (node ids) among those that arrived.

    ``content(node, instruction)`` builds each reply; a node missing from ``delays`` never answers. Evaluation
    messages are answered by nobody (``send_and_receive`` returns nothing).
    """

    pull_interval = 0.01

    def __init__(self, nodes, content, *, order=None, delays=None, per_pull=1):
        super().__init__(nodes)
        self.content = content
        self.order = list(order or self.node_ids)
        self.delays = {n: 0.0 for n in self.node_ids} if delays is None else dict(delays)
        self.per_pull = per_pull
        self.waiting: dict[str, tuple[float, int, Message]] = {}  # instruction id -> (arrives at, node, instruction)
        self.pushed = 0
        self.used_send_and_receive = False

    def push_messages(self, messages):
        ids, now = [], time.monotonic()
        for message in messages:
            self.pushed += 1
            message_id = f"ins-{self.pushed}"
            message.metadata.__dict__["_message_id"] = message_id
            node = message.metadata.dst_node_id
            if node in self.delays and message.metadata.message_type == MessageType.TRAIN:
                self.waiting[message_id] = (now + self.delays[node], node, message)
            ids.append(message_id)
        return ids

    def _reply(self, message_id: str, node: int, instruction: Message) -> Message:
        about = metadata(node, instruction.metadata.message_type, instruction.metadata.group_id, reply_to=message_id)
        return make_message(about, content=self.content(node, instruction))

    def pull_messages(self, message_ids):
        now, wanted = time.monotonic(), set(message_ids)
        ready = [(i, v) for i, v in self.waiting.items() if i in wanted and v[0] <= now]
        ready.sort(key=lambda item: self.order.index(item[1][1]))
        out = []
        for message_id, (_, node, instruction) in ready[: self.per_pull]:
            del self.waiting[message_id]
            out.append(self._reply(message_id, node, instruction))
        return out

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if any(m.metadata.message_type == MessageType.TRAIN for m in messages):
            self.used_send_and_receive = True
        ids = self.push_messages(messages)
        replies = []
        for message_id in ids:
            if message_id in self.waiting:
                _, node, instruction = self.waiting.pop(message_id)
                replies.append(self._reply(message_id, node, instruction))
        replies.sort(key=lambda m: self.order.index(m.metadata.src_node_id))
        return replies
