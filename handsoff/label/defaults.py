"""The labeler's training budget and option values, importable without torch (``handsoff fit-labeler --help``
shows them).

See `handsoff.label.train` for how the numbers were chosen.
"""
DEFAULT_STEPS = 300
DEFAULT_BATCH_PIXELS = 1024
#: ``fit_labeler(transfer_labels=...)`` / ``--transfer-labels``: none, or move the labels onto the
#: reconstructions by optical flow (`handsoff.label.transfer`).
TRANSFER_MODES = ("none", "flow")
#: The default: flow, which beat "none" on every task in benchmarks/levers.py (draw 0 of 16, refine 50:
#: labeler on held-out seg 0.276 -> 0.289, PCK@0.05 0.131 -> 0.181, depth RMSE 1.47 -> 1.30; downstream
#: from 2,000 generated images seg 0.284 -> 0.286, PCK 0.141 -> 0.200, depth 1.48 -> 1.30).
DEFAULT_TRANSFER = "flow"
#: Optical-flow methods of the transfer (OpenCV's DIS and Farneback) and the default, chosen by
#: `benchmarks/transfer.py`.
FLOW_METHODS = ("dis", "farneback")
DEFAULT_FLOW_METHOD = "dis"
