"""``msattn train``: the training loop read top to bottom (:mod:`msattn.train.loop`) and its parts."""
