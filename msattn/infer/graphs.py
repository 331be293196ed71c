"""Inference without launch overhead: the whole multi-scale forward as one CUDA graph per shape.

At batch 1 the 3-scale attention forward is launch-bound on a fast GPU (hundreds of small
kernels for the smaller scales, the resizes and the head). :class:`InferenceRunner` runs
it, together with the upsampling of the scores to the image, the softmax and the
attention maps, as a captured ``torch.cuda.CUDAGraph`` that is replayed with one launch.

Why CUDA graphs directly rather than ``torch.compile(mode="reduce-overhead")``: capturing
costs about three eager forwards (milliseconds), not an inductor compile of tens of seconds
per shape, and needs neither Triton nor a compile cache; the shapes, their number and the
eager fallback stay under our control (:class:`GraphCache`), where reduce-overhead
recompiles behind the scenes and marks shapes dynamic. ``msattn bench --compile --graph``
measures inductor's fused kernels inside the same capture, so the two can be compared on a
GPU (benchmarks/README.md).

Shapes: images are padded to size buckets (:mod:`msattn.infer.buckets`); a shape is
captured the second time it is seen (a one-off shape runs eager), at most ``max_graphs``
are kept (least recently used go first) and at most ``max_captures`` are ever made, so a
stream of ever-new shapes costs no more than eager. A capture that fails turns graphs off
for the run and says why. Everything here is off on CPU: there, inference is the eager
:func:`msattn.infer.forward.predict_batch`, unchanged.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from msattn.errors import UsageError
from msattn.geometry import resize_bilinear, resize_nearest, upsample_logits
from msattn.infer.buckets import DEFAULT_BUCKET, bucket_size, check_bucket, pad_to_size
from msattn.infer.forward import predict_batch
from msattn.infer.options import InferenceOptions

#: images per replayed batch at 513x513; larger buckets get proportionally fewer
CUDA_BATCH = 8
BATCH_PIXELS = CUDA_BATCH * 513 * 513

Outputs = tuple[torch.Tensor, "torch.Tensor | None"]  # (probs [N,C,H,W], attention [N,S,H,W] or None)


@dataclass(frozen=True)
class GraphPolicy:
    """When to capture: ``enabled`` (CUDA and not --no-compile), the bucket step and the cache bounds."""

    enabled: bool = False
    bucket: int = DEFAULT_BUCKET
    max_graphs: int = 4
    min_uses: int = 2  # a shape is captured the second time it is seen: one-off shapes stay eager
    max_captures: int = 16

    def __post_init__(self) -> None:
        check_bucket(self.bucket)
        if self.max_graphs < 1 or self.min_uses < 1 or self.max_captures < 0:
            raise ValueError("need max_graphs >= 1, min_uses >= 1, max_captures >= 0")

    @classmethod
    def for_device(cls, device: torch.device, compile_graphs: bool = True, bucket: int | None = None) -> GraphPolicy:
        """On for CUDA when ``compile_graphs`` (the default of evaluate and predict); always off on CPU."""
        return cls(enabled=compile_graphs and device.type == "cuda", bucket=DEFAULT_BUCKET if bucket is None else bucket)


def graph_policy(device: torch.device, compile_graphs: bool = True, bucket: int | None = None) -> GraphPolicy:
    """The policy of ``msattn evaluate`` / ``predict`` from their options (``--no-compile``, ``--bucket``)."""
    try:
        return GraphPolicy.for_device(device, compile_graphs, bucket)
    except ValueError as exc:
        raise UsageError(f"--bucket: {exc}") from None


def inference_batch_size(given: int | None, default: int, policy: GraphPolicy) -> int:
    """``given`` (--batch-size) when set; else ``default``, raised to :data:`CUDA_BATCH` when graphs are on,
    so that a GPU sees batches where the images share a bucket (larger buckets are split, see BATCH_PIXELS)."""
    if given is not None:
        return given
    return max(default, CUDA_BATCH) if policy.enabled else default


@dataclass
class GraphStats:
    """What the cache did: captures (and their one-time cost), replays, eager calls."""

    captures: int = 0
    capture_seconds: float = 0.0
    replays: int = 0
    eager_calls: int = 0
    evictions: int = 0
    shapes: list[Hashable] = field(default_factory=list)
    disabled: str | None = None  # why graphs were turned off during the run


class GraphCache:
    """Captured callables by key (an input shape), with an LRU bound and an eager fallback.

    ``capture(key, example)`` returns a callable that replays the captured work on a new
    input of the same shape; its outputs are valid until the next call. ``run(key, x, eager)``
    replays, captures or calls ``eager(x)`` according to the policy.
    """

    def __init__(
        self,
        policy: GraphPolicy,
        capture: Callable[[Hashable, torch.Tensor], Callable[[torch.Tensor], Any]],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.policy = policy
        self.capture = capture
        self.clock = clock
        self.graphs: OrderedDict[Hashable, Callable[[torch.Tensor], Any]] = OrderedDict()
        self.uses: dict[Hashable, int] = {}
        self.stats = GraphStats()

    @property
    def active(self) -> bool:
        return self.policy.enabled and self.stats.disabled is None

    def run(self, key: Hashable, x: torch.Tensor, eager: Callable[[torch.Tensor], Any]) -> Any:
        if not self.active:
            self.stats.eager_calls += 1
            return eager(x)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._maybe_capture(key, x)
            if graph is None:
                self.stats.eager_calls += 1
                return eager(x)
        self.graphs.move_to_end(key)
        self.stats.replays += 1
        return graph(x)

    def _maybe_capture(self, key: Hashable, x: torch.Tensor) -> Callable[[torch.Tensor], Any] | None:
        uses = self.uses[key] = self.uses.get(key, 0) + 1
        if len(self.uses) > 4096:  # a stream of ever-new shapes: forget the oldest counts
            self.uses.pop(next(iter(self.uses)))
        if uses < self.policy.min_uses or self.stats.captures >= self.policy.max_captures:
            return None
        while len(self.graphs) >= self.policy.max_graphs:
            self.graphs.popitem(last=False)
            self.stats.evictions += 1
        start = self.clock()
        try:
            graph = self.capture(key, x)
        except Exception as exc:  # noqa: BLE001 - any failure: run eager from here on, and say why
            self.stats.disabled = f"capture failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]})"
            self.graphs.clear()
            return None
        self.stats.capture_seconds += self.clock() - start
        self.stats.captures += 1
        self.stats.shapes.append(key)
        self.graphs[key] = graph
        return graph

    def summary(self) -> str | None:
        """One line on what the graphs cost and did (None when graphs were off from the start)."""
        s = self.stats
        if not self.policy.enabled:
            return None
        if s.disabled:
            return f"CUDA graphs: {s.disabled}; ran eager ({s.replays} replays before)"
        shapes = ", ".join(_shape_text(k) for k in s.shapes[:4]) + (", ..." if len(s.shapes) > 4 else "")
        captured = f"{s.captures} shape(s) captured in {s.capture_seconds:.2f} s once ({shapes})" if s.captures \
            else "no shape seen twice: nothing captured"
        evicted = f", {s.evictions} evicted" if s.evictions else ""
        return f"CUDA graphs: {captured}; {s.replays} replays, {s.eager_calls} eager call(s){evicted}"


def _shape_text(key: Hashable) -> str:
    if isinstance(key, tuple) and len(key) == 3:
        n, h, w = key
        return f"{w}x{h} x{n}"
    return str(key)


@contextlib.contextmanager
def cudnn_benchmark() -> Iterator[None]:
    """cudnn.benchmark on for a block (captured shapes get autotuned kernels; one-off shapes do not pay)."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def capture_cuda_graph(
    fn: Callable[[torch.Tensor], Any], example: torch.Tensor, pool: Any = None, warmup: int = 2
) -> Callable[[torch.Tensor], Any]:
    """Capture ``fn`` on a static copy of ``example``; returns ``replay(x)`` (copy x in, replay, return
    the static outputs, valid until the next replay of any graph of ``pool``)."""
    static_input = example.clone(memory_format=torch.preserve_format)
    stream = torch.cuda.Stream(device=example.device)
    stream.wait_stream(torch.cuda.current_stream(example.device))
    with cudnn_benchmark():
        with torch.cuda.stream(stream):  # warm-up on a side stream: autotuning, lazy init, allocator
            for _ in range(warmup):
                fn(static_input)
        torch.cuda.current_stream(example.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            static_output = fn(static_input)

    def replay(x: torch.Tensor) -> Any:
        static_input.copy_(x)
        graph.replay()
        return static_output

    return replay


class InferenceRunner:
    """Class probabilities and merge weights at image size for lists of images (evaluate, predict).

    Policy off (CPU, ``--no-compile``): same-size images go through
    :func:`msattn.infer.forward.predict_batch`, exactly as before. Policy on: the images of
    a group share a bucket (:meth:`group_key`), are padded to it, stacked (at most
    ``BATCH_PIXELS`` pixels a batch) and run through one captured graph per batch shape;
    every result is cropped back to its image and copied out of the graph's buffers.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        scales: Sequence[float] | None = None,
        flip: bool = False,
        amp_dtype: torch.dtype | None = None,
        pad_to: int | None = None,
        policy: GraphPolicy | None = None,
        capture: Callable[[Hashable, torch.Tensor], Callable[[torch.Tensor], Any]] | None = None,
    ) -> None:
        self.model = model
        self.scales = None if scales is None else tuple(float(s) for s in scales)
        self.flip = flip
        self.amp_dtype = amp_dtype
        self.pad_to = pad_to
        self.policy = policy or GraphPolicy()
        self.nearest = getattr(model, "merge", None) == "max"  # one-hot winner maps stay one-hot
        self._pool: Any = None
        self.cache = GraphCache(self.policy, capture or self._capture_cuda)

    def group_key(self, size: Sequence[int]) -> tuple[int, int]:
        """Images with the same key run in one batch: their bucket (policy on), else their exact size.

        The key depends on the policy alone, not on whether a capture failed: a run pads to
        the same buckets throughout, so its results do not depend on the graphs.
        """
        if self.policy.enabled:
            return bucket_size(size, self.policy.bucket, self.pad_to)
        return int(size[0]), int(size[1])

    def predict(self, images: torch.Tensor | Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Normalised images on the model's device, all of one :meth:`group_key` (a list of [3,H_i,W_i],
        or one batch [N,3,H,W]) -> [(probs [C,H_i,W_i] float32, attention [S,H_i,W_i] or None)]."""
        if len(images) == 0:
            return []
        keys = {self.group_key(img.shape[-2:]) for img in images}
        if len(keys) != 1:
            raise ValueError(f"images of one batch must share a size bucket, got {sorted(keys)}")
        if not self.policy.enabled:
            return self._eager(images)
        (bucket,) = keys
        per_batch = max(1, BATCH_PIXELS // (bucket[0] * bucket[1]))
        results: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        images = list(images)
        with torch.inference_mode():
            for start in range(0, len(images), per_batch):
                results += self._graph_batch(images[start : start + per_batch], bucket)
        return results

    # -------------------------------------------------------------------- the two paths

    def _eager(self, images: torch.Tensor | Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        batch = images if isinstance(images, torch.Tensor) else torch.stack(list(images))  # [N,3,H,W]
        probs, attention = predict_batch(
            self.model, batch, scales=self.scales, flip=self.flip, amp_dtype=self.amp_dtype, pad_to=self.pad_to
        )
        return [(probs[i], None if attention is None else attention[i]) for i in range(len(images))]

    def _graph_batch(
        self, images: Sequence[torch.Tensor], bucket: tuple[int, int]
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        sizes = [tuple(int(v) for v in img.shape[-2:]) for img in images]
        results = self._run_cropped([pad_to_size(img, bucket) for img in images], sizes)
        if not self.flip:
            return results
        mirrored = self._run_cropped([pad_to_size(img.flip(-1), bucket) for img in images], sizes)
        out = []
        for (p, a), (pf, af) in zip(results, mirrored):
            probs = (p + pf.flip(-1)) / 2
            attention = None if a is None or af is None else (a + af.flip(-1)) / 2
            out.append((probs, attention))
        return out

    def _run_cropped(
        self, padded: list[torch.Tensor], sizes: list[tuple[int, ...]]
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        batch = torch.stack(padded)  # [N,3,Hb,Wb]
        if batch.device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        n, _, hb, wb = batch.shape
        probs, attention = self.cache.run((n, hb, wb), batch, self.full_forward)
        # crop every image back and copy it out of the graph's static buffers before the next replay
        return [
            (probs[i, :, :h, :w].clone(), None if attention is None else attention[i, :, :h, :w].clone())
            for i, (h, w) in enumerate(sizes)
        ]

    def full_forward(self, padded: torch.Tensor) -> Outputs:
        """What a graph holds: padded [N,3,Hb,Wb] -> softmax probs [N,C,Hb,Wb], attention [N,S,Hb,Wb] or None."""
        full = tuple(padded.shape[-2:])
        autocast = contextlib.nullcontext() if self.amp_dtype is None else torch.autocast(
            padded.device.type, dtype=self.amp_dtype, cache_enabled=False  # no cached casts across a capture
        )
        with autocast:
            output = self.model(padded, scales=self.scales)
            probs = torch.softmax(upsample_logits(output["out"].float(), full), dim=1)
            attention = output.get("attention")
            if attention is not None:
                attention = (resize_nearest if self.nearest else resize_bilinear)(attention.float(), full)
        return probs, attention

    def _capture_cuda(self, key: Hashable, example: torch.Tensor) -> Callable[[torch.Tensor], Any]:
        if example.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        if self._pool is None:
            # one memory pool for all shapes: graphs never run concurrently, and every result is
            # copied out right after its replay, so one graph reusing another's memory is harmless
            self._pool = torch.cuda.graph_pool_handle()
        return capture_cuda_graph(self.full_forward, example, pool=self._pool)

    def summary(self) -> str | None:
        return self.cache.summary()


def make_runner(
    model: torch.nn.Module, options: InferenceOptions, device: torch.device, scales: Sequence[float] | None = None
) -> InferenceRunner:
    """The runner of ``options`` on ``device``: CUDA graphs over size buckets where :func:`graph_policy` says so,
    else the eager forward. ``scales`` (resolved for the model) replace ``options.scales``."""
    return InferenceRunner(
        model, scales=options.scales if scales is None else scales, flip=options.flip,
        amp_dtype=options.amp_dtype(device), pad_to=options.pad_to,
        policy=graph_policy(device, options.compile_graphs, options.bucket),
    )  # fmt: skip
