"""The pictures a run records, without ROS: the exploration map and side-by-side frames.

- `ExplorationMap`: the grid cells a position visited (coverage of the
  world) and a picture of them with the trajectory.
- `side_by_side`: camera frame | predicted next frame | actual next frame,
  as one labelled RGB picture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np


class ExplorationMap:
    """Grid cells of `cell_size` map units that a position has visited.

    Cell (i, j) holds x in [i*cell_size, (i+1)*cell_size), likewise y, so
    negative coordinates fall into negative cells. The trajectory keeps
    points at least a quarter cell apart, and halves itself (every other
    point) past `max_points`, so memory stays bounded on a run of days.
    """

    def __init__(self, cell_size: float = 64.0, max_points: int = 20_000) -> None:
        if not cell_size > 0:
            raise ValueError(f'cell_size must be > 0, got {cell_size}')
        self.cell_size = float(cell_size)
        self.visits: dict[tuple[int, int], int] = {}
        self.trajectory: list[tuple[float, float]] = []
        self.max_points = max_points
        self._min_move = self.cell_size / 4.0

    def cell(self, x: float, y: float) -> tuple[int, int]:
        return math.floor(x / self.cell_size), math.floor(y / self.cell_size)

    def visit(self, x: float, y: float) -> bool:
        """Count one visit; True if the cell is new. Non-finite positions are ignored."""
        if not (math.isfinite(x) and math.isfinite(y)):
            return False
        cell = self.cell(x, y)
        new = cell not in self.visits
        self.visits[cell] = self.visits.get(cell, 0) + 1
        if not self.trajectory or math.dist(self.trajectory[-1], (x, y)) >= self._min_move:
            self.trajectory.append((float(x), float(y)))
            if len(self.trajectory) > self.max_points:
                self.trajectory = self.trajectory[::2] + ([] if len(self.trajectory) % 2 else
                                                          [self.trajectory[-1]])
        return new

    @property
    def cells_visited(self) -> int:
        return len(self.visits)

    def to_json(self) -> dict[str, Any]:
        return {'cell_size': self.cell_size, 'cells_visited': self.cells_visited,
                'cells': [[i, j, n] for (i, j), n in sorted(self.visits.items())]}

    def render(self, max_size: int = 512) -> np.ndarray:
        """An RGB uint8 picture: visited cells shaded by visit count, the trajectory on top.

        +x to the right, +y up (map convention); one empty cell of margin
        around the visited ones; start in green, last position in red.
        """
        if not self.visits:
            return np.full((64, 64, 3), 32, np.uint8)
        cells = np.array(list(self.visits), dtype=np.int64)
        lo = cells.min(axis=0) - 1
        hi = cells.max(axis=0) + 1
        nx, ny = (hi - lo + 1).tolist()
        if max(nx, ny) > max_size:  # wider than the picture: k x k cells become one
            k = math.ceil(max(nx, ny) / max_size)
            coarse = ExplorationMap(self.cell_size * k, self.max_points)
            for (i, j), count in self.visits.items():  # floor(floor(x/c)/k) == floor(x/(c*k))
                coarse.visits[i // k, j // k] = coarse.visits.get((i // k, j // k), 0) + count
            coarse.trajectory = self.trajectory
            return coarse.render(max_size)
        px = int(max(2, min(32, max_size // max(nx, ny))))
        image = np.full((ny * px, nx * px, 3), 32, np.uint8)
        counts = np.array(list(self.visits.values()), dtype=np.float64)
        shade = np.log1p(counts) / math.log1p(counts.max()) if counts.max() > 0 else counts
        # Viridis from a third of the way up: one visit still stands out from the background.
        lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(-1, 1), cv2.COLORMAP_VIRIDIS)
        colors = lut[(80 + 175 * shade).astype(np.int64), 0, ::-1]  # BGR -> RGB
        for (i, j), color in zip(self.visits, colors, strict=True):
            col, row = i - lo[0], hi[1] - j  # y up: the highest cell row is image row 0
            image[row * px:(row + 1) * px, col * px:(col + 1) * px] = color
        if px >= 4:  # grid lines where cells are big enough to see them
            image[::px, :] //= 2
            image[:, ::px] //= 2

        def to_pixel(x: float, y: float) -> tuple[int, int]:
            u = (x / self.cell_size - lo[0]) * px
            v = (hi[1] + 1 - y / self.cell_size) * px
            return int(round(u)), int(round(v))

        points = np.array([to_pixel(x, y) for x, y in self.trajectory], dtype=np.int32)
        if len(points) > 1:
            # Half transparent: where cells are a few pixels the path would hide them.
            path = image.copy()
            cv2.polylines(path, [points.reshape(-1, 1, 2)], False, (235, 235, 235), 1, cv2.LINE_AA)
            image = cv2.addWeighted(image, 0.5, path, 0.5, 0.0)
        radius = max(2, px // 5)
        cv2.circle(image, tuple(points[0].tolist()), radius, (40, 200, 40), -1)
        cv2.circle(image, tuple(points[-1].tolist()), radius, (230, 40, 40), -1)
        return image


# -- images -------------------------------------------------------------------
def side_by_side(panels: Sequence[tuple[str, np.ndarray]], height: int = 252) -> np.ndarray:
    """Labelled RGB panels in one row, each scaled to `height` (nearest: pixels stay visible)."""
    if not panels:
        raise ValueError('no panels')
    label_h = 18
    tiles = []
    for label, rgb in panels:
        width = max(1, round(rgb.shape[1] * height / rgb.shape[0]))
        tile = np.full((height + label_h, width, 3), 16, np.uint8)
        tile[label_h:] = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_NEAREST)
        cv2.putText(tile, label, (4, label_h - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (230, 230, 230), 1,
                    cv2.LINE_AA)
        tiles.append(tile)
        tiles.append(np.full((height + label_h, 4, 3), 0, np.uint8))  # a thin gap
    return np.concatenate(tiles[:-1], axis=1)
