"""The Flax FID Inception computes the PyTorch reference's pool_3, sFID spatial features and
logits (to 1e-4 relative in fp32) with random values in every weight and BN statistic; the
TF1 legacy resize follows its formula; the converter knows exactly the keys and shapes of
pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` and names what it rejects."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mixflow_jax.convert.inception import convert_inception_state_dict, flax_path
from mixflow_jax.models import inception
from mixflow_jax.pretrained import load_inception
from tests import torch_inception

RTOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """On a shared 2-core machine PyTorch's thread pool spins against other processes: one
  thread runs the reference several times faster."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair(one_torch_thread):
  """(reference, its state_dict, converted Flax variables, jitted Flax apply)."""
  ref = torch_inception.random_fid_inception(seed=0)
  state = ref.state_dict()
  variables = convert_inception_state_dict(state)
  return ref, state, variables, jax.jit(inception.InceptionV3().apply)


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
  return float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("shape", [(2, 32, 32), (1, 64, 48), (1, 310, 303)],
                         ids=["32x32-up", "64x48-up", "310x303-down"])
def test_features_match_pytorch_reference(pair, shape):
  ref, _, variables, apply = pair
  n, h, w = shape
  images = np.random.default_rng(h * w).integers(0, 256, (n, h, w, 3)).astype(np.float32)
  with torch.no_grad():
    expected = {k: v.numpy() for k, v in ref(torch.from_numpy(images)).items()}
  got = jax.tree.map(np.asarray, apply(variables, jnp.asarray(images)))
  assert {k: v.shape for k, v in got.items()} == {
      "pool_3": (n, 2048), "spatial": (n, 2023), "logits": (n, 1008)}
  for key in ("pool_3", "spatial", "logits"):
    assert got[key].shape == expected[key].shape
    assert np.abs(expected[key]).max() > 0.1, key  # a real signal, not zeros
    err = _relative_error(got[key], expected[key])
    assert err <= RTOL, f"{key}: relative error {err:.2e}"


def _numpy_tf1_resize(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Independent per-pixel form of the formula, float64: (H, W) -> (out_h, out_w)."""
  in_h, in_w = image.shape
  out = np.empty((out_h, out_w))
  for i in range(out_h):
    sy = i * in_h / out_h
    y0 = int(np.floor(sy))
    y1, fy = min(y0 + 1, in_h - 1), sy - y0
    for j in range(out_w):
      sx = j * in_w / out_w
      x0 = int(np.floor(sx))
      x1, fx = min(x0 + 1, in_w - 1), sx - x0
      top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
      bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
      out[i, j] = top * (1 - fy) + bottom * fy
  return out


@pytest.mark.parametrize("in_hw, out_hw", [
    ((5, 7), (11, 3)),    # up in H, down in W
    ((6, 4), (3, 9)),     # down in H, up in W
    ((3, 4), (299, 13)),
    ((4, 5), (4, 5)),     # same size: identity
])
def test_tf1_resize_matches_the_legacy_formula(in_hw, out_hw):
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 255, (2, *in_hw, 3)).astype(np.float32)
  expected = np.stack([np.stack([_numpy_tf1_resize(img[..., c].astype(np.float64), *out_hw)
                                 for c in range(3)], -1) for img in images])
  got = np.asarray(inception.tf1_resize_bilinear(jnp.asarray(images), out_hw))
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
  torch_got = torch_inception.tf1_resize_bilinear(
      torch.from_numpy(images).permute(0, 3, 1, 2), *out_hw).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(torch_got, expected, rtol=0, atol=1e-4)


def test_tf1_resize_has_no_half_pixel_centres():
  """2 -> 4 pixels: sources 0, 0.5, 1, 1.5 (the last clamps to the edge), not the
  half-pixel grid that jax.image.resize uses."""
  row = jnp.asarray([10.0, 20.0]).reshape(1, 1, 2, 1)
  got = np.asarray(inception.tf1_resize_bilinear(row, (1, 4))).ravel()
  np.testing.assert_allclose(got, [10.0, 15.0, 20.0, 20.0])
  half_pixel = np.asarray(jax.image.resize(row, (1, 1, 4, 1), "bilinear")).ravel()
  assert not np.allclose(half_pixel, got)


# Known conv shapes of the weights file, (out, in, kh, kw); blocks expanded below.
_STEM = {"Conv2d_1a_3x3": (32, 3, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3),
         "Conv2d_2b_3x3": (64, 32, 3, 3), "Conv2d_3b_1x1": (80, 64, 1, 1),
         "Conv2d_4a_3x3": (192, 80, 3, 3)}
_BLOCKS = {  # name -> {branch: (out, in, kh, kw)}, 'cin' / 'pf' / 'c7' filled per block
    "A": {"branch1x1": (64, "cin", 1, 1), "branch5x5_1": (48, "cin", 1, 1),
          "branch5x5_2": (64, 48, 5, 5), "branch3x3dbl_1": (64, "cin", 1, 1),
          "branch3x3dbl_2": (96, 64, 3, 3), "branch3x3dbl_3": (96, 96, 3, 3),
          "branch_pool": ("pf", "cin", 1, 1)},
    "B": {"branch3x3": (384, "cin", 3, 3), "branch3x3dbl_1": (64, "cin", 1, 1),
          "branch3x3dbl_2": (96, 64, 3, 3), "branch3x3dbl_3": (96, 96, 3, 3)},
    "C": {"branch1x1": (192, "cin", 1, 1), "branch7x7_1": ("c7", "cin", 1, 1),
          "branch7x7_2": ("c7", "c7", 1, 7), "branch7x7_3": (192, "c7", 7, 1),
          "branch7x7dbl_1": ("c7", "cin", 1, 1), "branch7x7dbl_2": ("c7", "c7", 7, 1),
          "branch7x7dbl_3": ("c7", "c7", 1, 7), "branch7x7dbl_4": ("c7", "c7", 7, 1),
          "branch7x7dbl_5": (192, "c7", 1, 7), "branch_pool": (192, "cin", 1, 1)},
    "D": {"branch3x3_1": (192, "cin", 1, 1), "branch3x3_2": (320, 192, 3, 3),
          "branch7x7x3_1": (192, "cin", 1, 1), "branch7x7x3_2": (192, 192, 1, 7),
          "branch7x7x3_3": (192, 192, 7, 1), "branch7x7x3_4": (192, 192, 3, 3)},
    "E": {"branch1x1": (320, "cin", 1, 1), "branch3x3_1": (384, "cin", 1, 1),
          "branch3x3_2a": (384, 384, 1, 3), "branch3x3_2b": (384, 384, 3, 1),
          "branch3x3dbl_1": (448, "cin", 1, 1), "branch3x3dbl_2": (384, 448, 3, 3),
          "branch3x3dbl_3a": (384, 384, 1, 3), "branch3x3dbl_3b": (384, 384, 3, 1),
          "branch_pool": (192, "cin", 1, 1)},
}
_MIXED = [("Mixed_5b", "A", dict(cin=192, pf=32)), ("Mixed_5c", "A", dict(cin=256, pf=64)),
          ("Mixed_5d", "A", dict(cin=288, pf=64)), ("Mixed_6a", "B", dict(cin=288)),
          ("Mixed_6b", "C", dict(cin=768, c7=128)), ("Mixed_6c", "C", dict(cin=768, c7=160)),
          ("Mixed_6d", "C", dict(cin=768, c7=160)), ("Mixed_6e", "C", dict(cin=768, c7=192)),
          ("Mixed_7a", "D", dict(cin=768)), ("Mixed_7b", "E", dict(cin=1280)),
          ("Mixed_7c", "E", dict(cin=2048))]


def _known_state_dict_shapes() -> dict[str, tuple[int, ...]]:
  convs = dict(_STEM)
  for name, kind, fill in _MIXED:
    for branch, shape in _BLOCKS[kind].items():
      convs[f"{name}.{branch}"] = tuple(fill.get(d, d) for d in shape)
  shapes = {}
  for conv, shape in convs.items():
    shapes[f"{conv}.conv.weight"] = shape
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{conv}.bn.{leaf}"] = (shape[0],)
    shapes[f"{conv}.bn.num_batches_tracked"] = ()
  return dict(shapes, **{"fc.weight": (1008, 2048), "fc.bias": (1008,)})


def test_state_dict_keys_and_shapes_are_those_of_the_weights_file(pair):
  """94 conv + BN units, 6 tensors each (num_batches_tracked included: the file has them,
  pytorch-fid issue #34), plus fc.weight and fc.bias: 566 keys. Parameters: 23,850,960 =
  torchvision's inception_v3 (27,161,264 with the aux head and 1000 classes) minus the aux
  head (3,326,696) plus 8 more classes (8 x 2049); the Flax model drops fc.bias (1008)."""
  _, state, variables, _ = pair
  known = _known_state_dict_shapes()
  assert len(known) == 566
  assert {k: tuple(v.shape) for k, v in state.items()} == known
  with torch.device("meta"):
    ref = torch_inception.FIDInception()
  assert sum(p.numel() for p in ref.parameters()) == 23_850_960
  assert inception.param_count() == 23_850_960 - 1008
  n_bn = sum(math.prod(v) for k, v in known.items() if k.endswith("running_mean"))
  assert sum(x.size for x in jax.tree.leaves(variables["batch_stats"])) == 2 * n_bn


def test_flax_paths_mirror_state_dict_keys():
  assert flax_path("Mixed_6d.branch1x1.conv.weight") == (
      "params", ("Mixed_6d", "branch1x1", "conv", "kernel"))
  assert flax_path("Conv2d_1a_3x3.bn.weight") == ("params", ("Conv2d_1a_3x3", "bn", "scale"))
  assert flax_path("Mixed_7c.branch_pool.bn.running_var") == (
      "batch_stats", ("Mixed_7c", "branch_pool", "bn", "var"))
  assert flax_path("fc.weight") == ("params", ("fc", "kernel"))


def test_converter_names_bad_keys_and_shapes(pair):
  _, state, _, _ = pair
  bad = dict(state, **{"Mixed_6d.branch1x1.conv.weight": torch.zeros(192, 768, 3, 3)})
  with pytest.raises(ValueError, match=r"'Mixed_6d\.branch1x1\.conv\.weight' has shape "
                                       r"\(192, 768, 3, 3\).*needs \(1, 1, 768, 192\)"):
    convert_inception_state_dict(bad)
  bad = dict(state, **{"AuxLogits.fc.weight": torch.zeros(1008, 768)})
  with pytest.raises(ValueError, match=r"no counterpart.*'AuxLogits\.fc\.weight'"):
    convert_inception_state_dict(bad)
  bad = {k: v for k, v in state.items() if k != "Mixed_7c.branch_pool.bn.running_var"}
  with pytest.raises(ValueError, match=r"lacks 1 .*batch_stats/Mixed_7c/branch_pool/bn/var"):
    convert_inception_state_dict(bad)
  bad = dict(state, **{"fc.bias": torch.zeros(1000)})
  with pytest.raises(ValueError, match=r"'fc\.bias' has shape \(1000,\)"):
    convert_inception_state_dict(bad)


def _same_tree(a, b) -> bool:
  flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  return [p for p, _ in flat_a] == [p for p, _ in flat_b] and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(flat_a, flat_b))


def test_fc_bias_and_batch_counters_are_optional_and_unused(pair):
  _, state, variables, _ = pair
  trimmed = {k: v for k, v in state.items()
             if k != "fc.bias" and not k.endswith("num_batches_tracked")}
  again = convert_inception_state_dict(trimmed)
  assert _same_tree(again, variables)


def test_load_inception_reads_a_pth_file_and_names_a_missing_one(pair, tmp_path):
  _, state, variables, _ = pair
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  torch.save(state, path)
  module, loaded = load_inception(str(path))
  assert isinstance(module, inception.InceptionV3)
  assert _same_tree(loaded, variables)
  missing = str(tmp_path / "nowhere.pth")
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    load_inception(missing)
