"""TFDS ArrayRecord builders for the real datasets (no TensorFlow needed).

`builder_class(dataset)` maps the `prepare_data` dataset argument to its builder; the TFDS
name of each (e.g. 'cacl_kinetics400') is the directory under DATA that
`cacl_jax.data.real` reads. Imports are deferred so that the ingestion workers, which
import `cacl_jax.data.builders.ingest`, start without loading TFDS.
"""
import importlib

_BUILDERS = {
    "kinetics": ("cacl_jax.data.builders.kinetics", "CaclKinetics400"),
    "imagenet": ("cacl_jax.data.builders.imagenet", "CaclImagenet"),
    "voc": ("cacl_jax.data.builders.segmentation", "CaclVoc"),
    "cityscapes": ("cacl_jax.data.builders.segmentation", "CaclCityscapes"),
    "davis": ("cacl_jax.data.builders.davis", "CaclDavis2017"),
}
DATASETS = tuple(_BUILDERS)


def builder_class(dataset: str) -> type:
  """The TFDS builder class of 'kinetics' | 'imagenet' | 'voc' | 'cityscapes' | 'davis'."""
  if dataset not in _BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
  module, name = _BUILDERS[dataset]
  return getattr(importlib.import_module(module), name)
