"""Data: video / image sources, frame pairs, augmentations, segmentation sets.

The two record types every source produces (the contract between sources and pipelines):

* Pretraining sources are grain random-access sources whose items are `Video` objects
  (`cacl_jax.data.video`): `num_frames` and `frames(indices) -> uint8 [len, H, W, 3]`.
  Frames are decoded lazily, so a pair sampler only decodes the two frames it draws.
  An image dataset (ImageNet) is a source of one-frame videos.
* Segmentation sources (evaluation) are grain random-access sources whose items are dicts
  `{'image': uint8 [H, W, 3], 'label': uint8 [H, W] (255 = ignore), 'id': str}`, and which
  expose `class_names: tuple[str, ...]`.
"""
