"""msattn: scale-aware semantic segmentation (Attention to Scale, Chen et al., CVPR 2016)."""

__version__ = "0.3.0.dev0"
