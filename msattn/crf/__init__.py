"""The fully connected CRF: one image (:mod:`msattn.crf.dense`) and folders of saved probabilities (``crf-refine``)."""
