"""Running a trained model: ``msattn evaluate`` and ``msattn predict``, the forward pass, backends, CUDA graphs."""
