"""The training step's CPU-visible cleanups (issue 18): every convolution sees channels_last, labels
are shrunk once per output size, and the loss is unchanged by that."""

from __future__ import annotations

import pytest
import torch

import msattn.models.loss as loss_module
from msattn.models.loss import cross_entropy, segmentation_loss
from msattn.models.scale import build_model


def _channels_last_inputs(model: torch.nn.Module) -> tuple[list[str], list]:
    """Forward pre-hooks on every conv: names of those whose input is not channels_last."""
    bad: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            def hook(mod, inputs, name=name):
                if not inputs[0].is_contiguous(memory_format=torch.channels_last):
                    bad.append(name)
            handles.append(module.register_forward_pre_hook(hook))
    return bad, handles


@pytest.mark.parametrize("merge", ["attention", "max"])
def test_every_convolution_runs_channels_last_in_training_and_inference(merge: str) -> None:
    torch.manual_seed(0)
    model = build_model(3, scales=(1.0, 0.75, 0.5), merge=merge, width=1 / 16).to(memory_format=torch.channels_last)
    bad, handles = _channels_last_inputs(model)
    images = torch.randn(2, 3, 49, 49).contiguous(memory_format=torch.channels_last)
    model.train()
    loss, _ = segmentation_loss(model(images), torch.randint(0, 3, (2, 49, 49)))
    loss.backward()
    model.eval()
    with torch.inference_mode():
        model(images)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert convs >= 16 and bad == []
    for handle in handles:
        handle.remove()


def test_labels_are_shrunk_once_per_output_size_and_the_loss_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = build_model(3, scales=(1.0, 0.75, 0.5), merge="attention", width=1 / 16)
    labels = torch.randint(0, 3, (2, 49, 49))
    labels[:, :5] = 255
    outputs = model(torch.randn(2, 3, 49, 49))
    expected = {"merged": cross_entropy(outputs["out"], labels)}
    for scale, logits in zip(outputs["scales"], outputs["per_scale"]):
        expected[f"scale_{scale:g}"] = cross_entropy(logits, labels)

    calls = []
    real = loss_module.downsample_labels
    def counting(lab: torch.Tensor, size: tuple) -> torch.Tensor:
        if tuple(lab.shape[-2:]) != tuple(size):  # a real shrink (the same size returns the labels as they are)
            calls.append(tuple(size))
        return real(lab, size)

    monkeypatch.setattr(loss_module, "downsample_labels", counting)
    total, terms = segmentation_loss(outputs, labels)
    assert sorted(calls) == sorted({tuple(p.shape[-2:]) for p in outputs["per_scale"]})  # 3 sizes for 4 terms
    assert terms.keys() - {"attention_entropy", "attention_score_gap"} == expected.keys()
    assert all(torch.equal(terms[k], expected[k]) for k in expected)
    assert torch.equal(total, torch.stack(list(expected.values())).sum())
