"""Deployment: the whole multi-scale model as one ONNX graph, and running it with onnxruntime.

- :mod:`msattn.export.graph`: :class:`DeployGraph`, the traceable pixels-to-probabilities module.
- :mod:`msattn.export.onnx`: ``msattn export`` (torch.export -> ONNX, metadata, self-check).
- :mod:`msattn.export.runtime`: onnxruntime session and the predict backend.

onnx, onnxscript and onnxruntime are the optional extra ``msattn[export]``; nothing here
imports them until it is used.
"""
