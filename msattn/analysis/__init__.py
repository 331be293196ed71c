"""``msattn analyze``: what each scale contributes, per class, object size and scale subset, in one pass.

- :mod:`.methods`: the per-scale maps, max/avg merges of any subset, the model's merge and the oracle, from one forward.
- :mod:`.objects`: objects (connected components per class) and size bins.
- :mod:`.accumulate`: the running sums of a pass (resumable).
- :mod:`.summary`: sums -> the numbers of ``report.json``; :mod:`.costs`: FLOPs and bench latency per subset.
- :mod:`.run`: the command; :mod:`.html`, :mod:`.plots`, :mod:`.gallery`, :mod:`.terminal`: the outputs.
"""
