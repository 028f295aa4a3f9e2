"""Where to put a chart's text labels so that none covers another label, a marker or the plot's edge.

Charting libraries place a point's text beside the point and let texts collide: variants that
measure alike (fp32, graph and fp16 all at ~1.0x and cosine ~1.0) then print over each other.
This is a small greedy placer in pixel space (y grows downwards, as on screen): each label tries
spots on rings of growing distance around its marker, nearest first, and takes the first spot
that stays inside the plot area and clears every marker, every label already placed and the
"soft" obstacles (thin things like the gate line or an error bar that a label should rather not
hide). A leader line from the marker to its label, drawn by the chart, keeps far labels readable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Extra distance (px) between a marker's edge and its label, ring by ring, nearest first.
RINGS = (4, 14, 28, 46, 70, 100, 135, 175, 220, 270)
# Directions tried on each ring (degrees, 0 = right, 90 = down): sideways first, where text reads best.
ANGLES = (0, 180, -30, 30, 150, -150, -90, 90, -60, 60, -120, 120)
GAP = 3.0  # px of air kept between a label and anything else


@dataclass(frozen=True)
class Box:
    """An axis-aligned rectangle in pixels."""

    left: float
    top: float
    right: float
    bottom: float

    @classmethod
    def centred(cls, x: float, y: float, width: float, height: float) -> Box:
        return cls(x - width / 2, y - height / 2, x + width / 2, y + height / 2)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.left + self.right) / 2, (self.top + self.bottom) / 2

    def overlap(self, other: Box, gap: float = 0.0) -> float:
        """Area shared with ``other`` grown by ``gap`` on every side (0 when they are apart)."""
        width = min(self.right, other.right + gap) - max(self.left, other.left - gap)
        height = min(self.bottom, other.bottom + gap) - max(self.top, other.top - gap)
        return width * height if width > 0 and height > 0 else 0.0

    def inside(self, outer: Box) -> bool:
        return (self.left >= outer.left and self.top >= outer.top
                and self.right <= outer.right and self.bottom <= outer.bottom)


@dataclass(frozen=True)
class Marker:
    """A round marker at (x, y) px that a label belongs to."""

    x: float
    y: float
    radius: float

    @property
    def box(self) -> Box:
        return Box.centred(self.x, self.y, 2 * self.radius, 2 * self.radius)


def candidates(marker: Marker, width: float, height: float) -> list[Box]:
    """Spots for a ``width`` x ``height`` label around ``marker``, nearest ring first."""
    spots = []
    for ring in RINGS:
        for angle in ANGLES:
            cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            x = marker.x + (marker.radius + ring + width / 2) * cos
            y = marker.y + (marker.radius + ring + height / 2) * sin
            spots.append(Box.centred(x, y, width, height))
    return spots


def place_labels(markers: Sequence[Marker], sizes: Sequence[tuple[float, float]], area: Box, *,
                 obstacles: Sequence[Box] = (), soft: Sequence[Box] = ()) -> list[Box]:
    """One box per marker, for a label of the given (width, height), in the order given.

    Every box lies inside ``area``. Boxes clear each other, every marker and ``obstacles``
    whenever the area has room; ``soft`` obstacles are given up before that, and before them the
    wish that no leader line (marker to label centre) crosses another label. Where nothing is
    free (far more labels than room) a label takes the spot it overlaps least.
    """
    taken: list[Box] = [m.box for m in markers] + list(obstacles)
    leaders: list[Segment] = []
    placed: list[Box] = []
    for marker, (width, height) in zip(markers, sizes):
        spots = [spot for spot in candidates(marker, width, height) if spot.inside(area)]
        if not spots:  # a label wider than the area: centre it, it cannot do better
            spots = [Box.centred((area.left + area.right) / 2, marker.y, width, height)]
        box = (_first_clear(spots, marker, taken + list(soft), placed, leaders)
               or _first_clear(spots, marker, taken, placed, leaders)
               or _first_clear(spots, marker, taken, [], [])
               or min(spots, key=lambda spot: sum(spot.overlap(other, GAP) for other in taken)))
        placed.append(box)
        taken.append(box)
        leaders.append(((marker.x, marker.y), box.centre))
    return placed


Segment = tuple[tuple[float, float], tuple[float, float]]


def _first_clear(spots: list[Box], marker: Marker, taken: list[Box], labels: list[Box],
                 leaders: list[Segment]) -> Box | None:
    """The first spot that clears ``taken``, whose leader crosses none of ``labels`` and that no leader crosses."""
    for spot in spots:
        if any(spot.overlap(other, GAP) for other in taken):
            continue
        leader = ((marker.x, marker.y), spot.centre)
        if any(crosses(leader, label) for label in labels) or any(crosses(other, spot) for other in leaders):
            continue
        return spot
    return None


def crosses(segment: Segment, box: Box) -> bool:
    """Whether the segment passes through the box (Liang-Barsky clipping)."""
    (x0, y0), (x1, y1) = segment
    dx, dy = x1 - x0, y1 - y0
    low, high = 0.0, 1.0
    for step, room in ((-dx, x0 - box.left), (dx, box.right - x0), (-dy, y0 - box.top), (dy, box.bottom - y0)):
        if step == 0:
            if room < 0:
                return False
            continue
        t = room / step
        if step < 0:
            low = max(low, t)
        else:
            high = min(high, t)
        if low > high:
            return False
    return True
