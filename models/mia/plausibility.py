"""Is this mesh shaped like a standing character? A cheap outline test run before rigging.

MIA's networks predict a Mixamo skeleton for anything they are given, so a cube or a ball is
rigged without complaint into a meaningless result. A character in T- or A-pose seen from the
front has a sparse outline: limbs and gaps between them leave most of its bounding box empty.
The surface is sampled, projected on its two widest principal axes (height and arm span for a
standing figure), and the share of a 16×16 grid over that rectangle the samples touch is the
fill. The procedural humanoid fills about a third; a box, cylinder or ball fills 65-100%.
"""

from __future__ import annotations

import numpy as np

from .lazy_trimesh import trimesh

FILL_GRID = 16
FILL_LIMIT = 0.6      # outlines at or above this are solid blobs, not figures with limbs
SAMPLES = 8192


def outline_fill(mesh: trimesh.Trimesh, seed: int = 0) -> float:
    """Share (0..1) of the front-outline grid cells the surface touches."""
    points, _ = trimesh.sample.sample_surface(mesh, SAMPLES, seed=np.random.default_rng(seed))
    centred = points - points.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    flat = centred @ axes[:2].T
    low, span = flat.min(axis=0), np.ptp(flat, axis=0)
    cells = np.clip((flat - low) / np.where(span > 0, span, 1.0) * FILL_GRID, 0, FILL_GRID - 1).astype(np.int64)
    return len(np.unique(cells[:, 0] * FILL_GRID + cells[:, 1])) / FILL_GRID ** 2


def humanoid_doubt(mesh: trimesh.Trimesh, what: str = "The mesh") -> str | None:
    """A warning when the mesh is far from a standing humanoid, else None."""
    fill = outline_fill(mesh)
    if fill < FILL_LIMIT:
        return None
    return (f"{what} does not look like a standing humanoid: its outline fills {fill:.0%} of its bounding box "
            f"(a character in T- or A-pose fills well under {FILL_LIMIT:.0%}). MIA rigs humanoid characters only, "
            "so this rig is likely meaningless.")
