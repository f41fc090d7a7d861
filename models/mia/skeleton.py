"""The 52-joint Mixamo skeleton MIA predicts, in network output order.

Facts, not code: joint order, parents and tree levels are what the published networks were trained
on (the tree-causal heads decode level by level, so the order and levels must match exactly); the
template rest heads (cm) and bone axes come from the Mixamo "X Bot" template and give exported
bones the orientation Mixamo clips expect (+Y along the bone, roll from the template +Z).
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "mixamorig:"


@dataclass(frozen=True)
class Joint:
    index: int
    short_name: str
    parent: int                                  # -1 for the root (Hips)
    level: int                                   # depth from Hips, 0..10
    template_head_cm: tuple[float, float, float]
    template_y_axis: tuple[float, float, float]  # world-space bone +Y (along the bone) in the template
    template_z_axis: tuple[float, float, float]  # world-space bone +Z (roll reference) in the template

    @property
    def name(self) -> str:
        return PREFIX + self.short_name

    @property
    def is_finger(self) -> bool:
        return any(f in self.short_name for f in FINGERS)


FINGERS = ("Thumb", "Index", "Middle", "Ring", "Pinky")

# (short name, parent, tree level, template head cm, template +Y, template +Z)
_TABLE: tuple[tuple, ...] = (
    ("Hips", -1, 0, (0, 104.27, 1.55), (0, 1, 0.013), (0, -0.013, 1)),
    ("Spine", 0, 1, (0, 114.45, 1.69), (0, 0.989, -0.147), (0, 0.147, 0.989)),
    ("Spine1", 1, 2, (0, 124.35, 0.22), (0, 0.989, -0.147), (0, 0.147, 0.989)),
    ("Spine2", 2, 3, (0, 133.57, -1.16), (0, 0.993, -0.121), (0, 0.121, 0.993)),
    ("Neck", 3, 4, (0, 150.31, -3.2), (0, 0.993, -0.121), (0, 0.121, 0.993)),
    ("Head", 4, 5, (0, 159.93, -1.52), (0, 0.993, -0.121), (0, 0.121, 0.993)),
    ("LeftShoulder", 3, 4, (4.57, 144.58, -3.32), (0.977, -0.048, -0.206), (-0.049, -0.999, 0)),
    ("LeftArm", 6, 5, (15.16, 144.06, -5.55), (1, 0, 0), (0, -1, 0)),
    ("LeftForeArm", 7, 6, (43, 144.06, -5.55), (1, 0, 0), (0, -1, 0)),
    ("LeftHand", 8, 7, (71.33, 144.06, -5.55), (1, 0, 0), (0, -1, 0)),
    ("LeftHandThumb1", 9, 8, (73.8, 142.48, -2.87), (0.775, -0.447, 0.447), (-0.501, -0.866, 0.001)),
    ("LeftHandThumb2", 10, 9, (77.04, 140.61, -0.99), (0.775, -0.447, 0.447), (-0.5, -0.866, -0.001)),
    ("LeftHandThumb3", 11, 10, (79.69, 139.08, 0.53), (0.775, -0.447, 0.447), (-0.499, -0.866, -0.002)),
    ("LeftHandIndex1", 9, 8, (80.44, 143.54, -3.29), (1, 0, 0), (0, -1, 0)),
    ("LeftHandIndex2", 13, 9, (84.14, 143.54, -3.29), (1, 0, 0), (0, -1, 0)),
    ("LeftHandIndex3", 14, 10, (86.99, 143.54, -3.29), (1, 0, 0), (0, -1, 0)),
    ("LeftHandMiddle1", 9, 8, (80.87, 144.06, -5.55), (1, 0, 0), (0, -1, 0)),
    ("LeftHandMiddle2", 16, 9, (84.57, 144.06, -5.55), (1, 0, 0), (0, -1, 0)),
    ("LeftHandMiddle3", 17, 10, (87.52, 144.06, -5.55), (1, 0, 0), (0, -1, 0)),
    ("LeftHandRing1", 9, 8, (80.44, 144.01, -7.41), (1, 0, 0), (0, -1, 0)),
    ("LeftHandRing2", 19, 9, (83.59, 144.01, -7.41), (1, 0, 0), (0, -1, 0)),
    ("LeftHandRing3", 20, 10, (86.54, 144.01, -7.41), (1, 0, 0), (0, -1, 0)),
    ("LeftHandPinky1", 9, 8, (79.41, 143.57, -9.35), (1, 0, 0), (0, -1, 0)),
    ("LeftHandPinky2", 22, 9, (83.01, 143.57, -9.35), (1, 0, 0), (0, -1, 0)),
    ("LeftHandPinky3", 23, 10, (85.11, 143.57, -9.35), (1, 0, 0), (0, -1, 0)),
    ("RightShoulder", 3, 4, (-4.57, 144.58, -3.32), (-0.977, -0.048, -0.206), (0.049, -0.999, 0)),
    ("RightArm", 25, 5, (-15.16, 144.06, -5.55), (-1, 0, 0), (0, -1, 0)),
    ("RightForeArm", 26, 6, (-43, 144.06, -5.55), (-1, 0, 0), (0, -1, 0)),
    ("RightHand", 27, 7, (-71.33, 144.06, -5.55), (-1, 0, 0), (0, -1, 0)),
    ("RightHandThumb1", 28, 8, (-73.8, 142.48, -2.87), (-0.775, -0.447, 0.447), (0.501, -0.866, 0.002)),
    ("RightHandThumb2", 29, 9, (-77.04, 140.61, -0.99), (-0.775, -0.447, 0.447), (0.5, -0.866, -0.001)),
    ("RightHandThumb3", 30, 10, (-79.69, 139.08, 0.53), (-0.775, -0.447, 0.447), (0.499, -0.867, -0.002)),
    ("RightHandIndex1", 28, 8, (-80.44, 143.54, -3.29), (-1, 0, 0), (0, -1, 0)),
    ("RightHandIndex2", 32, 9, (-84.14, 143.54, -3.29), (-1, 0, 0), (0, -1, 0)),
    ("RightHandIndex3", 33, 10, (-86.99, 143.54, -3.29), (-1, 0, 0), (0, -1, 0)),
    ("RightHandMiddle1", 28, 8, (-80.87, 144.06, -5.55), (-1, 0, 0), (0, -1, 0)),
    ("RightHandMiddle2", 35, 9, (-84.57, 144.06, -5.55), (-1, 0, 0), (0, -1, 0)),
    ("RightHandMiddle3", 36, 10, (-87.52, 144.06, -5.55), (-1, 0, 0), (0, -1, 0)),
    ("RightHandRing1", 28, 8, (-80.44, 144.01, -7.41), (-1, 0, 0), (0, -1, 0)),
    ("RightHandRing2", 38, 9, (-83.82, 144.01, -7.41), (-1, 0, 0), (0, -1, 0)),
    ("RightHandRing3", 39, 10, (-86.71, 144.01, -7.41), (-1, 0, 0), (0, -1, 0)),
    ("RightHandPinky1", 28, 8, (-79.41, 143.57, -9.35), (-1, 0, 0), (0, -1, 0)),
    ("RightHandPinky2", 41, 9, (-83.01, 143.57, -9.35), (-1, 0, 0), (0, -1, 0)),
    ("RightHandPinky3", 42, 10, (-85.11, 143.57, -9.35), (-1, 0, 0), (0, -1, 0)),
    ("LeftUpLeg", 0, 1, (8.21, 97.52, -0.05), (0, -1, 0.009), (0, 0.009, 1)),
    ("LeftLeg", 44, 2, (8.21, 53.15, 0.36), (0, -0.998, -0.07), (0, -0.07, 0.998)),
    ("LeftFoot", 45, 3, (8.21, 8.73, -2.74), (0, -0.632, 0.775), (0, 0.775, 0.632)),
    ("LeftToeBase", 46, 4, (8.21, 0, 7.97), (0, 0, 1), (0, 1, 0)),
    ("RightUpLeg", 0, 1, (-8.21, 97.52, -0.05), (0, -1, 0.009), (0, 0.009, 1)),
    ("RightLeg", 48, 2, (-8.21, 53.15, 0.36), (0, -0.998, -0.07), (0, -0.07, 0.998)),
    ("RightFoot", 49, 3, (-8.21, 8.73, -2.74), (0, -0.632, 0.775), (0, 0.775, 0.632)),
    ("RightToeBase", 50, 4, (-8.21, 0, 7.97), (0, 0, 1), (0, 1, 0)),
)

JOINTS: tuple[Joint, ...] = tuple(Joint(i, *row) for i, row in enumerate(_TABLE))
JOINT_COUNT = len(JOINTS)
NAMES: tuple[str, ...] = tuple(j.name for j in JOINTS)
PARENTS: tuple[int, ...] = tuple(j.parent for j in JOINTS)
INDEX: dict[str, int] = {j.name: j.index for j in JOINTS}
LEVEL_COUNT = max(j.level for j in JOINTS) + 1

# The 22 joints kept with no_fingers, in upstream order (old indices 0-9, 25-28, 44-51).
NO_FINGERS_INDICES: tuple[int, ...] = tuple(j.index for j in JOINTS if not j.is_finger)


def index_of(short_name: str) -> int:
    return INDEX[PREFIX + short_name]


def ancestors(index: int) -> list[int]:
    """Parents of a joint up to the root, nearest first."""
    out = []
    parent = PARENTS[index]
    while parent >= 0:
        out.append(parent)
        parent = PARENTS[parent]
    return out


def level_masks() -> list[list[bool]]:
    """For each tree level, which joints sit on it (the decoding order of the tree-causal heads)."""
    return [[j.level == lv for j in JOINTS] for lv in range(LEVEL_COUNT)]


def attention_mask() -> list[list[bool]]:
    """mask[i][k]: joint i may attend to joint k (itself and all its ancestors)."""
    rows = []
    for j in JOINTS:
        allowed = {j.index, *ancestors(j.index)}
        rows.append([k in allowed for k in range(JOINT_COUNT)])
    return rows


def parent_mask() -> list[list[bool]]:
    """mask[i][k]: k is the direct parent of joint i."""
    return [[k == j.parent for k in range(JOINT_COUNT)] for j in JOINTS]


def subset(no_fingers: bool) -> tuple[int, ...]:
    """Joint indices exported for a rig: all 52, or the 22 without fingers."""
    return NO_FINGERS_INDICES if no_fingers else tuple(range(JOINT_COUNT))
