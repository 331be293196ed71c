"""What training, inference, benchmarks and analysis share: checkpoints, processes and devices, data loading, metrics."""
