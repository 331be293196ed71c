"""Engine: training, evaluation, prediction, metrics, checkpoints, distributed, benchmarks."""
