"""How a UI workflow must look when it opens: the geometry both layout tests check.

The static test (tests/test_workflow_layout.py) reads the rectangles stored in the file; the frontend
test (tests/integration/test_comfyui_frontend.py) reads the ones ComfyUI's frontend really draws, which
can be taller than the stored size when a node's widgets need more room. Both use these rules.

VIEWPORT and SAFE_AREA are the canvas of ComfyUI's frontend 1.35.9 in a 1400×900 headless Chromium
window: the canvas is 1400×757 CSS px, and its free part excludes the workflow tab bar and the floating
menus above y = 100, the side tool bar left of x = 70 and the minimap column right of x = 1130.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

NODE_TITLE_HEIGHT = 30        # LiteGraph draws the title bar above node.pos
VIEWPORT = (1400, 757)
SAFE_AREA = (70, 100, 1130, 747)  # left, top, right, bottom in screen px
HF_RESOLVE = "https://huggingface.co/"

Rect = tuple[float, float, float, float]  # x0, y0, x1, y1 in graph units


def stored_rect(node: dict) -> Rect:
    """The rectangle a node occupies in graph units, title bar included, from the file alone."""
    x, y = node["pos"]
    w, h = node["size"]
    return (x, y - NODE_TITLE_HEIGHT, x + w, y + h)


def bounding_rect(bounding: Sequence[float]) -> Rect:
    """LiteGraph's node.getBounding() ([x, y, w, h], title included) as a rectangle."""
    x, y, w, h = bounding
    return (x, y, x + w, y + h)


def overlapping_pairs(rects: dict[int, Rect]) -> list[tuple[int, int]]:
    ids = sorted(rects)
    pairs = []
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            ra, rb = rects[a], rects[b]
            if ra[0] < rb[2] and rb[0] < ra[2] and ra[1] < rb[3] and rb[1] < ra[3]:
                pairs.append((a, b))
    return pairs


def outside_safe_area(rects: dict[int, Rect], offset: Sequence[float], scale: float) -> list[int]:
    """Nodes not wholly visible in the free part of the canvas under the saved view (extra.ds)."""
    left, top, right, bottom = SAFE_AREA
    hidden = []
    for node_id, (x0, y0, x1, y1) in sorted(rects.items()):
        sx0, sy0 = (x0 + offset[0]) * scale, (y0 + offset[1]) * scale
        sx1, sy1 = (x1 + offset[0]) * scale, (y1 + offset[1]) * scale
        if sx0 < left or sy0 < top or sx1 > right or sy1 > bottom:
            hidden.append(node_id)
    return hidden


def model_entry_problems(node: dict) -> Iterable[str]:
    """What keeps the frontend from offering a node's model files for download.

    The frontend's schema requires name, url and directory on every properties.models entry (a missing
    url fails the whole workflow's validation), and it lists an entry only when its name is one of the
    node's widget values.
    """
    values = {v for v in node.get("widgets_values", []) if isinstance(v, str)}
    for entry in node.get("properties", {}).get("models", []) or []:
        label = f"node {node['id']} ({node['type']}) model {entry.get('name')!r}"
        for key in ("name", "url", "directory"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                yield f"{label}: no {key}"
        url = entry.get("url") or ""
        if not url.startswith(HF_RESOLVE) or "/resolve/" not in url or not url.endswith("/" + str(entry.get("name"))):
            yield f"{label}: url {url!r} is not a Hugging Face download link of that file"
        if entry.get("name") not in values and node["type"] != "MIALoadModel":
            yield f"{label}: the name is not one of the node's widget values, so the frontend never offers it"
