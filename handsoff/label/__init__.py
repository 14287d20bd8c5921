"""The hypercolumn labeler: per-pixel MLP ensembles on StyleGAN2 synthesis features (HandsOff).

Modules (imported explicitly; nothing heavy is imported here):

* `handsoff.label.model`: `LabelerConfig`, `HypercolumnLabeler` (``predict``, ``predict_naive``,
  ``forward_rows``) with exact factorised inference.
* `handsoff.label.train`: `fit_labeler`, training on sampled pixels without the hypercolumn matrix.
* `handsoff.label.infer`: `label_ws`, latents -> images + `LabelPrediction` in one call.
* `handsoff.label.evaluate`: `evaluate_labeler`, mIoU / PCK / depth scores on a labeled set.
* `handsoff.label.io`: `save_labeler` / `load_labeler`, the labeler file tied to its generator.
* `handsoff.label.transfer`: `transfer_labels`, labels moved onto the reconstructions by optical
  flow (``fit_labeler(transfer_labels='flow')``).
* `handsoff.label.heads`, `handsoff.label.features`, `handsoff.label.targets`: the task heads
  and uncertainty, exact bilinear resampling and row gathering, label preparation.
* `handsoff.label.prediction`: `LabelPrediction`, what the labeler returns.
* `handsoff.label.cli`: ``handsoff fit-labeler``; `handsoff.label.defaults`: its training budget.
"""
