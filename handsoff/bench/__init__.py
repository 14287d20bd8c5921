"""Downstream benchmarks: train a standard model on labeled folders and/or generated corpora, score it on real images.

* `handsoff.bench.train.train_and_score` - train one model for one task and score it (``handsoff bench``),
  with mixing shares, pretrain-finetune and a pretrained start;
* `handsoff.bench.models.build_model` - the downstream models (a small UNet, DeepLabV3);
* `handsoff.bench.pretrained` - ImageNet VGG encoders for the UNet, read offline (transfer learning);
* `handsoff.bench.tasks` - losses, decoding and scores per task (seg, keypoints, depth);
* `handsoff.bench.data` - opening training sets (folders, corpora), uncertainty filtering, checks.

Submodules are not imported here, so that ``handsoff --help`` does not load torch.
"""
