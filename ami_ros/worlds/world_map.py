"""A level's map as grids, without ROS: walls rasterised, cells visited, the trail.

Coordinates are the world's own (ViZDoom map units, +x east, +y north), the
ones `world/pose` carries. A grid's cell (col, row) holds
x in [(origin_col + col) * resolution, (origin_col + col + 1) * resolution),
likewise y: cells are aligned to multiples of the resolution, so a grid
of `cell_size` cells counts exactly the cells of the recorder's exploration
map (ami_ros.record.pictures.ExplorationMap: floor(x / cell_size)).
Row 0 is the lowest y, column 0 the lowest x, data row-major: the layout
of nav_msgs/OccupancyGrid.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

WALL, FREE, UNKNOWN = 100, 0, -1  # OccupancyGrid values
VISITED = 100


class Segment(NamedTuple):
    """One line of the level; `blocking`: the player cannot cross it (a wall)."""

    x1: float
    y1: float
    x2: float
    y2: float
    blocking: bool = True


@dataclass(frozen=True)
class GridGeometry:
    """Where a grid lies: its cell size and its cell-aligned lower left corner."""

    resolution: float  # map units per cell side
    origin_col: int  # index of column 0 in the world's own cell numbering
    origin_row: int
    width: int  # columns
    height: int  # rows

    @classmethod
    def covering(cls, segments: Iterable[Segment], resolution: float, margin: int = 1) -> GridGeometry:
        """The smallest aligned grid holding every segment, with `margin` cells around."""
        if not resolution > 0:
            raise ValueError(f'resolution must be > 0, got {resolution}')
        points = [(s.x1, s.y1) for s in segments] + [(s.x2, s.y2) for s in segments]
        if not points:
            raise ValueError('no segments: the level has no lines')
        xs, ys = zip(*points, strict=True)
        lo_col = math.floor(min(xs) / resolution) - margin
        lo_row = math.floor(min(ys) / resolution) - margin
        hi_col = math.floor(max(xs) / resolution) + margin
        hi_row = math.floor(max(ys) / resolution) + margin
        return cls(float(resolution), lo_col, lo_row, hi_col - lo_col + 1, hi_row - lo_row + 1)

    @property
    def origin(self) -> tuple[float, float]:
        """The map point of the grid's lower left corner."""
        return self.origin_col * self.resolution, self.origin_row * self.resolution

    def cell(self, x: float, y: float) -> tuple[int, int]:
        """(col, row) of the cell holding (x, y); may lie outside the grid."""
        # The same division as ExplorationMap.cell, so both agree on boundaries.
        return (math.floor(x / self.resolution) - self.origin_col,
                math.floor(y / self.resolution) - self.origin_row)

    def contains(self, col: int, row: int) -> bool:
        return 0 <= col < self.width and 0 <= row < self.height

    def centers(self) -> tuple[np.ndarray, np.ndarray]:
        """Map x and y of every cell centre, each (height, width)."""
        xs = (self.origin_col + np.arange(self.width) + 0.5) * self.resolution
        ys = (self.origin_row + np.arange(self.height) + 0.5) * self.resolution
        return np.meshgrid(xs, ys)


def segment_cells(segment: Segment, geometry: GridGeometry) -> set[tuple[int, int]]:
    """Every cell the segment passes through (its ends included).

    The segment is cut where it crosses a grid line; the middle of each piece
    lies inside one cell, so no cell it crosses is missed, however steep.
    """
    res = geometry.resolution
    x1, y1, x2, y2 = segment.x1, segment.y1, segment.x2, segment.y2
    cuts = [0.0, 1.0]
    for a, b in ((x1, x2), (y1, y2)):
        if a != b:
            lo, hi = sorted((a, b))
            for k in range(math.ceil(lo / res), math.floor(hi / res) + 1):
                cuts.append((k * res - a) / (b - a))
    cuts = sorted(t for t in cuts if 0.0 <= t <= 1.0)
    ts = cuts + [(t0 + t1) / 2.0 for t0, t1 in zip(cuts, cuts[1:], strict=False)]
    return {geometry.cell(x1 + t * (x2 - x1), y1 + t * (y2 - y1)) for t in ts}


def inside_mask(polygon: Sequence[Segment], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Which points (xs, ys) the closed lines of one sector enclose (even-odd rule)."""
    inside = np.zeros(xs.shape, dtype=bool)
    for s in polygon:
        if s.y1 == s.y2:
            continue  # a horizontal edge crosses no horizontal ray
        straddles = (s.y1 > ys) != (s.y2 > ys)
        x_cross = s.x1 + (ys - s.y1) * (s.x2 - s.x1) / (s.y2 - s.y1)
        inside ^= straddles & (xs < x_cross)
    return inside


def wall_grid(sectors: Sequence[Sequence[Segment]], geometry: GridGeometry) -> np.ndarray:
    """int8 (height, width): WALL where a blocking line passes, FREE where a cell's centre
    is inside a sector, UNKNOWN elsewhere (outside the level)."""
    xs, ys = geometry.centers()
    inside = np.zeros(xs.shape, dtype=bool)
    for lines in sectors:
        inside |= inside_mask(lines, xs, ys)
    grid = np.where(inside, FREE, UNKNOWN).astype(np.int8)
    for lines in sectors:
        for segment in lines:
            if segment.blocking:
                for col, row in segment_cells(segment, geometry):
                    if geometry.contains(col, row):
                        grid[row, col] = WALL
    return grid


def visited_grid(cells: Iterable[tuple[int, int]], geometry: GridGeometry) -> np.ndarray:
    """int8 (height, width): VISITED at the given (col, row) cells, FREE elsewhere."""
    grid = np.full((geometry.height, geometry.width), FREE, dtype=np.int8)
    for col, row in cells:
        if geometry.contains(col, row):
            grid[row, col] = VISITED
    return grid


class Trail:
    """The poses (x, y, yaw) of one episode, at least `spacing` map units apart.

    Holds the latest `length` poses: on a long episode the oldest part goes.
    `version` grows with every change, so a publisher sends only what changed.
    """

    def __init__(self, spacing: float = 8.0, length: int = 2000) -> None:
        if spacing < 0 or length < 2:
            raise ValueError(f'spacing must be >= 0 and length >= 2, got {spacing}, {length}')
        self.spacing = float(spacing)
        self.poses: deque[tuple[float, float, float]] = deque(maxlen=int(length))
        self.version = 0

    def add(self, x: float, y: float, yaw: float) -> bool:
        """Append the pose if it is `spacing` from the last one; True if it was."""
        if not (math.isfinite(x) and math.isfinite(y)):
            return False
        if self.poses and math.dist(self.poses[-1][:2], (x, y)) < max(self.spacing, 1e-9):
            return False
        self.poses.append((float(x), float(y), float(yaw)))
        self.version += 1
        return True

    def restart(self) -> None:
        self.poses.clear()
        self.version += 1
