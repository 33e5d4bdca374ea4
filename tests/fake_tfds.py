"""A tiny TFDS builder for tests: an ImageNet-like dataset (``image``, ``label``) prepared
from a manual download (a folder CLASS/IMAGE.jpg), so that nothing is downloaded."""

import os

import tensorflow_datasets as tfds


class FakeImagenet(tfds.core.GeneratorBasedBuilder):
  """Registered as ``fake_imagenet``; once prepared, readable without this class."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put CLASS/IMAGE.jpg files in manual_dir."
  CLASSES = ("n01", "n02", "n03")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=self.CLASSES)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(dl_manager.manual_dir)}

  def _generate_examples(self, root):
    for name in sorted(os.listdir(root)):
      for file in sorted(os.listdir(os.path.join(root, name))):
        yield f"{name}/{file}", {"image": os.path.join(root, name, file), "label": name}
