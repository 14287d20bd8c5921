"""The labeler's training budget, importable without torch (``handsoff fit-labeler --help`` shows it).

See `handsoff.label.train` for how the numbers were chosen.
"""
DEFAULT_STEPS = 300
DEFAULT_BATCH_PIXELS = 1024
