"""No host-device sync in the hot paths: the training step, the model forward, the confusion matrix.

On CUDA an op whose result size or value the host must read (``.item()``, ``bool(t)``,
boolean-mask indexing, ``nonzero``, ``bincount``, ...) makes the CPU wait for the GPU and
leaves the GPU idle while the next kernels are queued. We cannot time that on CPU, but we
can see every aten op that is dispatched: :class:`SyncRecorder` lists those that need a
device-to-host answer, and the tests require that list to be empty.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from msattn.infer.forward import predict_batch
from msattn.models.loss import segmentation_loss
from msattn.models.params import param_groups
from msattn.models.scale import build_model
from msattn.runtime.distributed import DistInfo
from msattn.runtime.metrics import ConfusionMatrix
from msattn.train.step import NonFiniteGuard, train_step

# aten ops that, on CUDA, block the host until the device answers
SYNC_OPS = {
    "aten._local_scalar_dense",  # .item(), bool(t), int(t), float(t)
    "aten.is_nonzero",
    "aten.nonzero",
    "aten.masked_select",
    "aten.bincount",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.repeat_interleave",
    "aten.equal",
    "aten.allclose",
}


class SyncRecorder(TorchDispatchMode):
    """Records the sync ops dispatched while active (boolean-mask indexing counts as one)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        name = name if name.startswith("aten.") else f"aten.{name}"
        if name in SYNC_OPS or (name in ("aten.index", "aten.index_put_", "aten.index_put") and _bool_index(args)):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or [])


def test_the_recorder_sees_the_syncs_it_must_catch() -> None:
    x = torch.arange(6.0)
    with SyncRecorder() as rec:
        x.sum().item()
        bool(x.max() > 2)
        x[x > 2]
        torch.bincount(x.long())
        x.nonzero()
    assert rec.ops == ["aten._local_scalar_dense", "aten._local_scalar_dense", "aten.index", "aten.bincount",
                       "aten.nonzero"], rec.ops


def tiny_model(merge: str = "attention", scales: tuple[float, ...] = (1.0, 0.5)) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(3, scales=scales, merge=merge, width=0.0625, dropout=0.5)


def micro_batches(count: int = 2, m: int = 2, size: int = 32) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        labels = torch.randint(0, 3, (m, size, size), generator=generator)
        labels[:, 0] = 255
        batches.append({"image": torch.randn(m, 3, size, size, generator=generator), "label": labels})
    return batches


def run_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, guard: NonFiniteGuard, loss_fn: Any,
             batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return train_step(
        model,
        batches,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda", enabled=False),
        guard=guard,
        device=torch.device("cpu"),
        amp_dtype=None,
        channels_last=True,
        loss_fn=loss_fn,
        loss_options={"extra_supervision": True, "label_mode": "downsample", "ignore_index": 255},
        scales=(1.0, 0.5),
        info=DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")),
    )


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_a_training_step_with_accumulation_never_syncs(optimizer_name: str) -> None:
    """With the fused optimizers that training uses on CUDA."""
    model = tiny_model().to(memory_format=torch.channels_last).train()
    groups = param_groups(model, 0.01, 5e-4)
    optimizer = (torch.optim.SGD(groups, lr=0.01, momentum=0.9, fused=True) if optimizer_name == "sgd"
                 else torch.optim.AdamW(groups, lr=0.01, fused=True))
    guard = NonFiniteGuard(torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    with SyncRecorder() as rec:
        for _ in range(2):
            terms = run_step(model, optimizer, guard, segmentation_loss, micro_batches())
    assert rec.ops == []
    assert set(terms) == {"loss", "merged", "scale_1", "scale_0.5", "attention_entropy", "attention_score_gap"} and torch.isfinite(terms["loss"])
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # it did learn
    assert guard.first_bad() is None


@pytest.mark.parametrize("fused", [True, None], ids=["fused-as-on-cuda", "cpu-kernels"])
def test_a_nonfinite_loss_halts_every_later_update(fused: bool | None) -> None:
    model = tiny_model().train()
    optimizer = torch.optim.SGD(param_groups(model, 0.01, 5e-4), lr=0.01, momentum=0.9, fused=fused)
    guard = NonFiniteGuard(torch.device("cpu"))
    calls = {"n": 0}

    def loss_nan_in_step_3(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        total, terms = segmentation_loss(*args, **kwargs)
        return (total * math.inf if calls["n"] in (5, 6) else total), terms  # both micro-batches of step 3

    for _ in range(2):
        run_step(model, optimizer, guard, loss_nan_in_step_3, micro_batches())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    with SyncRecorder() as rec:
        for _ in range(3):  # the bad step, then two good ones: all skipped
            run_step(model, optimizer, guard, loss_nan_in_step_3, micro_batches())
    assert rec.ops == ([] if fused else ["aten._local_scalar_dense"] * 3)  # the CPU kernels: the host reads the flag
    assert guard.first_bad() == (2, math.inf)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    for p, m in zip(model.parameters(), momentum):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], m)


def merge_model(merge: str) -> tuple[torch.nn.Module, tuple[float, ...]]:
    """A three-scale model of ``merge`` and its test-time scales (hierarchical: trained on two, run on three)."""
    if merge == "hierarchical":
        return tiny_model(merge, scales=(1.0, 0.5)), (1.0, 0.75, 0.5)
    return tiny_model(merge, scales=(1.0, 0.75, 0.5)), (1.0, 0.75, 0.5)


@pytest.mark.parametrize("merge", ["attention", "max", "avg", "hierarchical"])
def test_the_forward_and_predict_batch_never_sync(merge: str) -> None:
    model, scales = merge_model(merge)
    images = torch.randn(2, 3, 40, 40)
    with SyncRecorder() as rec:
        model.train()
        out = model(images)
        segmentation_loss(out, torch.randint(0, 3, (2, 40, 40)))[0].backward()
        model.eval()
        probs, attention = predict_batch(model, images, scales=scales, flip=True)
    assert rec.ops == []
    assert probs.shape == (2, 3, 40, 40) and attention is not None and attention.shape == (2, 3, 40, 40)


def test_the_confusion_matrix_fills_without_syncing_and_counts_right() -> None:
    target = torch.tensor([[0, 1, 2, 255], [1, 1, 7, 0]])
    pred = torch.tensor([[0, 2, 2, 1], [1, 0, 1, 9]])
    matrix = ConfusionMatrix(3, ignore_index=255)
    with SyncRecorder() as rec:
        matrix.update(pred, target)
    assert rec.ops == []
    expected = torch.zeros(3, 3, dtype=torch.int64)
    for t, p in [(0, 0), (1, 2), (2, 2), (1, 1), (1, 0), (0, 2)]:  # 255 and 7 uncounted; 9 clamps to 2
        expected[t, p] += 1
    assert torch.equal(matrix.mat, expected)


@pytest.mark.parametrize("merge", ["attention", "max", "hierarchical"])
def test_what_a_cuda_graph_captures_and_the_batches_moved_to_the_device_never_sync(merge: str) -> None:
    """A sync inside torch.cuda.graph capture is an error: the captured forward must have none."""
    from _graph_helpers import static_capture

    from msattn.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from msattn.infer.graphs import GraphPolicy, InferenceRunner
    from msattn.runtime.loader import DeviceBatches

    model, scales = merge_model(merge)
    runner = InferenceRunner(model.eval(), scales=scales, flip=True, policy=GraphPolicy(enabled=True))
    runner.cache.capture = static_capture(runner)
    images = [torch.randn(3, 40, 40), torch.randn(3, 33, 47)]
    batch = {"image": torch.randint(0, 256, (2, 3, 9, 9), dtype=torch.uint8),
             "label": torch.randint(0, 3, (2, 9, 9), dtype=torch.uint8)}
    with SyncRecorder() as rec:
        for _ in range(3):  # eager, capture, replay
            results = runner.predict(images)
        moved = next(DeviceBatches([batch], torch.device("cpu"), IMAGENET_MEAN, IMAGENET_STD))
    assert rec.ops == []
    assert runner.cache.stats.captures == 1 and [p.shape for p, _ in results] == [(3, 40, 40), (3, 33, 47)]
    assert moved["image"].dtype == torch.float32 and moved["label"].dtype == torch.int64
