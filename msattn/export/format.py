"""What an msattn ONNX file is (its format tag) and the optional packages export and onnxruntime need."""

from __future__ import annotations

import importlib

from msattn.errors import DependencyError

FORMAT = "msattn-onnx-1"
INSTALL_HINT = "pip install 'msattn[export]'  (onnx, onnxscript and onnxruntime)"


def require(*modules: str, what: str = "msattn export") -> None:
    """Import ``modules`` or raise DependencyError saying how to install the extra."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise DependencyError(f"{what} needs the '{name}' package: {INSTALL_HINT}") from None
