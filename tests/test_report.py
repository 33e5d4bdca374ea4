"""The report's image grid keeps every image whole, in row-major cells."""

import numpy as np

from mixflow_jax.report import image_grid


def test_image_grid_places_images_row_major():
  images = np.stack([np.full((3, 2, 1), i / 10 - 1) for i in range(6)])  # image i = value i
  grid = image_grid(images, rows=2, cols=3, pad=1)
  assert grid.shape == (2 * 4 - 1, 3 * 3 - 1)
  for i in range(6):
    r, c = divmod(i, 3)
    cell = grid[r * 4:r * 4 + 3, c * 3:c * 3 + 2]
    np.testing.assert_allclose(cell, (i / 10 - 1 + 1) / 2)
  assert grid[3, 0] == 0.5  # separator
