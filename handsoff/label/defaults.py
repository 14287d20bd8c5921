"""The labeler's training budget and option values, importable without torch (``handsoff fit-labeler --help``
shows them).

See `handsoff.label.train` for how the numbers were chosen.
"""
DEFAULT_STEPS = 300
DEFAULT_BATCH_PIXELS = 1024
#: ``fit_labeler(transfer_labels=...)`` / ``--transfer-labels``: none, or move the labels onto the
#: reconstructions by optical flow (`handsoff.label.transfer`).
TRANSFER_MODES = ("none", "flow")
#: Optical-flow methods of the transfer (OpenCV's DIS and Farneback) and the default, chosen by
#: `benchmarks/transfer.py`.
FLOW_METHODS = ("dis", "farneback")
DEFAULT_FLOW_METHOD = "dis"
