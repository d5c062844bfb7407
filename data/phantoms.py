"""Synthetic head-CT phantoms: the embedded default dataset, so every task can be trained and scored on a laptop.

Each case is a head in Hounsfield units (air, skull, brain, ventricles) on a canonical `(D, H, W) = (S, A, R)` grid,
with at most one finding of a known type, side and size: intraparenchymal, intraventricular, subdural, epidural or
subarachnoid hemorrhage, or a calvarial fracture; large space-occupying bleeds push the midline (mass effect with
midline shift). The case's report, questions, answers, boxes and masks are derived from the lesion that was drawn, so
labels agree with the image by construction (and the tests measure the masks to check it).

Axes: W grows towards the patient's right (RAS), so "left" lesions lie at small W indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

HU_AIR, HU_SKULL, HU_BRAIN, HU_CSF = -1000, 1100, 34, 5
HU_BLOOD = {"intraparenchymal": 72, "intraventricular": 68, "subdural": 70, "epidural": 76, "subarachnoid": 62}
HEMORRHAGE_TYPES = tuple(HU_BLOOD)
FINDING_TYPES = HEMORRHAGE_TYPES + ("fracture",)
SIDES = ("left", "right")
SIZES = ("small", "medium", "large")
# Lesion scale as a fraction of the head's half-width, per size class: large enough to survive 16x64x64 inputs.
SIZE_SCALE = {"small": 0.16, "medium": 0.24, "large": 0.32}
CHOICE_LETTERS = ("A", "B", "C", "D")


@dataclass
class Finding:
    """The lesion drawn into a phantom.

    Args:
        kind (`str`): one of `FINDING_TYPES`.
        side (`str`): `"left"`, `"right"` or `"bilateral"` (subdural only).
        size (`str`): one of `SIZES`.
        mask (`np.ndarray` of shape `(D, H, W)`, bool): the lesion's voxels.
        box (`list[float]`): its bounding box `(z1, y1, x1, z2, y2, x2)` normalised to [0, 1].
        midline_shift_mm (`float`): the shift of the midline it causes (0 without mass effect).
    """

    kind: str
    side: str
    size: str
    mask: np.ndarray
    box: list[float]
    midline_shift_mm: float = 0.0

    @property
    def is_hemorrhage(self) -> bool:
        return self.kind in HEMORRHAGE_TYPES

    def describe(self) -> str:
        """e.g. `"left intraparenchymal hemorrhage"` or `"right calvarial fracture"`."""
        noun = "calvarial fracture" if self.kind == "fracture" else f"{self.kind} hemorrhage"
        return f"{self.side} {noun}"


@dataclass
class PhantomCase:
    """One phantom: volume, finding (or none), report and question-answer pairs.

    Args:
        case_id (`str`), volume (`np.ndarray` of shape `(D, H, W)`, int16 HU), spacing (`tuple[float, ...]`, mm),
        finding (`Finding`, *optional*), report (`str`), qa (`list[dict]`: question, answer, question_type, choices,
        and for positioning / segmentation the box or a flag that the lesion mask is the target).
    """

    case_id: str
    volume: np.ndarray
    spacing: tuple[float, float, float]
    finding: Finding | None
    report: str
    qa: list[dict] = field(default_factory=list)


def normalised_grid(shape):
    """Sparse coordinates in [-1, 1] along each axis, `(z, y, x)` broadcastable to `shape`."""
    return np.meshgrid(*(np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape), indexing="ij", sparse=True)


def box_of(mask: np.ndarray) -> list[float]:
    """Normalised bounding box `(z1, y1, x1, z2, y2, x2)` of a boolean mask (voxel edges, in [0, 1])."""
    box_min, box_max = [], []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box_min.append(present[0] / mask.shape[axis])
        box_max.append((present[-1] + 1) / mask.shape[axis])
    return [round(float(v), 3) for v in box_min + box_max]


class HeadPhantom:
    """Draws one head and its finding; all geometry is vectorised over the grid."""

    def __init__(self, shape, rng: np.random.Generator):
        self.shape = tuple(shape)
        self.rng = rng
        self.z, self.y, self.x = normalised_grid(self.shape)
        # Head radii (z, y, x) and skull thickness, jittered per case.
        self.radii = np.array([0.88, 0.86, 0.74]) * rng.uniform(0.95, 1.05, 3)
        self.skull = 0.12 * rng.uniform(0.9, 1.1)

    def radius(self, shift_x: float = 0.0, scale: float = 1.0) -> np.ndarray:
        r = self.radii * scale
        return np.sqrt((self.z / r[0]) ** 2 + (self.y / r[1]) ** 2 + ((self.x - shift_x) / r[2]) ** 2)

    def draw_head(self, midline_shift: float) -> tuple[np.ndarray, np.ndarray]:
        """The normal anatomy: returns the HU volume and the brain mask."""
        radius = self.radius()
        volume = np.full(self.shape, HU_AIR, dtype=np.float32)
        head = radius < 1.0
        brain = radius < 1.0 - self.skull
        volume[head] = HU_SKULL
        volume[brain] = HU_BRAIN
        # Smooth grey/white texture rather than i.i.d. noise: realistic enough and it compresses in Parquet shards.
        texture = 3.0 * np.sin(9 * self.x + 2) * np.cos(7 * self.y) * np.sin(5 * self.z + 1)
        volume += np.where(brain, texture, 0.0)
        for sign in (-1.0, 1.0):  # lateral ventricles, displaced with the midline
            centre_x = sign * 0.14 + midline_shift
            ventricle = ((self.z - 0.05) / 0.32) ** 2 + ((self.y - 0.05) / 0.42) ** 2 + ((self.x - centre_x) / 0.09) ** 2
            volume[ventricle < 1.0] = HU_CSF
        return volume, brain

    def side_sign(self, side: str) -> float:
        return -1.0 if side == "left" else 1.0

    def lesion_mask(self, kind: str, side: str, size: str, brain: np.ndarray) -> np.ndarray:
        """Voxels of a lesion of this kind, side and size."""
        scale = SIZE_SCALE[size] * self.rng.uniform(0.9, 1.1)
        sign = self.side_sign(side)
        jitter = self.rng.uniform(-0.12, 0.12, 2)
        inner = self.radius() / (1.0 - self.skull)  # 1 at the inner table of the skull
        if kind == "intraparenchymal":
            centre = np.array([jitter[0], jitter[1], sign * 0.38])
            blob = ((self.z - centre[0]) ** 2 + (self.y - centre[1]) ** 2 + (self.x - centre[2]) ** 2) / scale**2
            return (blob < 1.0) & brain
        if kind == "intraventricular":
            centre_x = sign * 0.14
            ventricle = ((self.z - 0.05) / 0.32) ** 2 + ((self.y - 0.05) / 0.42) ** 2 + ((self.x - centre_x) / 0.09) ** 2
            # Blood layers in the dependent (posterior, low y) part of the ventricle; size sets how far it fills.
            return (ventricle < 1.1) & (self.y < -0.3 + 2.2 * scale)
        if kind in ("subdural", "epidural"):
            on_side = sign * self.x > 0.05
            extent = ((self.z - jitter[0]) ** 2 + (self.y - jitter[1]) ** 2) < (0.5 + 1.2 * scale) ** 2
            if kind == "epidural":  # lens-shaped: thick in the middle, tapering, within a limited patch
                patch = ((self.z - jitter[0]) ** 2 + (self.y - jitter[1]) ** 2) / (0.35 + 0.8 * scale) ** 2
                thickness = 0.9 * scale * np.clip(1.0 - patch, 0.0, None)
                return on_side & (inner < 1.0) & (inner > 1.0 - thickness)
            thickness = 0.45 * scale
            return on_side & extent & (inner < 1.0) & (inner > 1.0 - thickness)
        if kind == "subarachnoid":
            # Blood in the sulci near the convexity and the sylvian fissure region of one side.
            on_side = sign * self.x > 0.1
            band = (inner < 0.97) & (inner > 0.97 - 0.35 * scale)
            sulci = np.sin(14 * self.y + 3 * self.z) > 0.2
            return on_side & band & sulci & (np.abs(self.z - jitter[0]) < 0.3 + scale)
        if kind == "fracture":
            skull = (self.radius() < 1.0) & (inner >= 1.0)
            plane = np.abs(self.y - jitter[1] - 0.3 * (self.z - jitter[0])) < 0.035 + 0.05 * scale
            return skull & plane & (sign * self.x > 0.2) & (np.abs(self.z - jitter[0]) < 0.25 + scale)
        raise ValueError(f"Unknown finding type {kind!r}; choose one of {FINDING_TYPES}")


def draw_case(shape, rng: np.random.Generator, normal_fraction: float) -> tuple[np.ndarray, Finding | None]:
    """The volume (HU) and its finding (or `None` for a normal case)."""
    phantom = HeadPhantom(shape, rng)
    if rng.random() < normal_fraction:
        volume, _ = phantom.draw_head(midline_shift=0.0)
        return volume, None
    kind = FINDING_TYPES[rng.integers(len(FINDING_TYPES))]
    size = SIZES[rng.integers(len(SIZES))]
    side = SIDES[rng.integers(len(SIDES))]
    if kind == "subdural" and rng.random() < 0.2:
        side = "bilateral"
    # Mass effect: large space-occupying bleeds on one side push the midline to the other side.
    pushes = kind in ("intraparenchymal", "subdural", "epidural") and size == "large" and side != "bilateral"
    shift = -phantom.side_sign(side) * 0.08 if pushes else 0.0
    volume, brain = phantom.draw_head(midline_shift=shift)
    sides = ("left", "right") if side == "bilateral" else (side,)
    mask = np.zeros(shape, dtype=bool)
    for one_side in sides:
        mask |= phantom.lesion_mask(kind, one_side, size, brain)
    if not mask.any():  # a degenerate draw on a tiny grid: fall back to a normal case
        return volume, None
    volume[mask] = HU_BLOOD.get(kind, HU_BRAIN)
    shift_mm = abs(shift) * phantom.radii[2] * shape[2] / 2 * 0.9  # 0.9 mm voxels across
    return volume, Finding(kind, side, size, mask, box_of(mask), round(float(shift_mm), 1))


REPORT_NORMAL = (
    "Findings: No acute intracranial hemorrhage. The ventricles are normal in size. No midline shift. The calvarium "
    "is intact. Impression: Normal non-contrast head CT.",
    "Findings: Gray-white differentiation is preserved. No intra- or extra-axial collection. Midline structures are "
    "centered. No fracture. Impression: No acute intracranial abnormality.",
    "Findings: There is no evidence of hemorrhage, mass effect or midline shift. Bones are unremarkable. "
    "Impression: Unremarkable head CT.",
)
FINDING_SENTENCES = {
    "intraparenchymal": (
        "There is a {size} hyperdense intraparenchymal hemorrhage in the {side} cerebral hemisphere.",
        "A {size} acute intraparenchymal hematoma is seen in the {side} hemisphere.",
    ),
    "intraventricular": (
        "Hyperdense blood layers in the {side} lateral ventricle, consistent with {size} intraventricular hemorrhage.",
        "There is {size} intraventricular hemorrhage within the {side} lateral ventricle.",
    ),
    "subdural": (
        "A {size} crescentic hyperdense subdural hematoma overlies the {side} cerebral convexity.",
        "There is a {size} acute subdural hemorrhage along the {side} convexity.",
    ),
    "epidural": (
        "A {size} biconvex hyperdense epidural hematoma is present over the {side} convexity.",
        "There is a {size} lentiform epidural hemorrhage on the {side}.",
    ),
    "subarachnoid": (
        "Hyperdense blood fills the {side} convexity sulci, consistent with {size} subarachnoid hemorrhage.",
        "There is {size} subarachnoid hemorrhage in the {side} cerebral sulci.",
    ),
    "fracture": (
        "There is a {size} linear fracture of the {side} calvarium without an underlying hematoma.",
        "A {size} nondisplaced {side} calvarial fracture is seen.",
    ),
}


def write_report(finding: Finding | None, rng: np.random.Generator) -> str:
    """A radiology report (findings and impression) in varied wording that states the finding's type, side, size."""
    if finding is None:
        return REPORT_NORMAL[rng.integers(len(REPORT_NORMAL))]
    sentence = FINDING_SENTENCES[finding.kind][rng.integers(2)]
    side = "both" if finding.side == "bilateral" else finding.side
    findings = sentence.format(size=finding.size, side=side).replace("the both", "both")
    if finding.midline_shift_mm > 0:
        findings += f" There is mass effect with {finding.midline_shift_mm:.0f} mm of midline shift."
    else:
        findings += " No midline shift."
    if finding.kind != "fracture":
        findings += " The calvarium is intact." if rng.random() < 0.5 else " No fracture."
    return f"Findings: {findings} Impression: {finding.describe().capitalize()}."


def four_choices(correct: str, pool, rng: np.random.Generator) -> tuple[list[str], str]:
    """Four options (the correct one among three distractors from `pool`) and the M3D-style answer `"B. Right"`."""
    distractors = [option for option in pool if option != correct]
    options = [correct] + list(rng.choice(distractors, size=3, replace=False))
    rng.shuffle(options)
    letter = CHOICE_LETTERS[options.index(correct)]
    return [f"{letter}. {o}" for letter, o in zip(CHOICE_LETTERS, options)], f"{letter}. {correct}"


def yes_no(value: bool) -> str:
    return "Yes." if value else "No."


def question_answers(finding: Finding | None, rng: np.random.Generator) -> list[dict]:
    """Closed (yes/no and four-choice), open, positioning and segmentation questions about the case (seed 002,
    section 4.2: hemorrhage type and side; chronic bleed, fracture, calvarial fracture, mass effect, midline shift)."""
    hemorrhage = finding is not None and finding.is_hemorrhage
    fracture = finding is not None and finding.kind == "fracture"
    shifted = finding is not None and finding.midline_shift_mm > 0
    type_names = [t.capitalize() for t in HEMORRHAGE_TYPES] + ["No hemorrhage"]
    correct_type = finding.kind.capitalize() if hemorrhage else "No hemorrhage"
    type_choices, type_answer = four_choices(correct_type, type_names, rng)
    side_names = ["Left", "Right", "Bilateral", "No lesion"]
    side_choices, side_answer = four_choices(finding.side.capitalize() if finding else "No lesion", side_names, rng)
    # Categories as M3D-VQA's: what is abnormal (presence and type of a finding), and where it is.
    qa = [
        dict(question="Is there an intracranial hemorrhage?", answer=yes_no(hemorrhage)),
        dict(question="Is there a skull fracture?", answer=yes_no(fracture)),
        dict(question="Is there a calvarial fracture?", answer=yes_no(fracture)),
        dict(question="Is there mass effect?", answer=yes_no(shifted)),
        dict(question="Is there a midline shift?", answer=yes_no(shifted)),
        dict(question="Is there a chronic bleed?", answer="No."),
        dict(question="What type of hemorrhage is present? " + " ".join(type_choices), answer=type_answer,
             choices=type_choices),
        dict(question="On which side is the abnormality? " + " ".join(side_choices), answer=side_answer,
             choices=side_choices, question_category="location"),
    ]
    qa = [{"question_type": "closed", "question_category": "abnormality", **item} for item in qa]
    if finding is None:
        qa.append(dict(question="What type of hemorrhage is there, and on which side?",
                       answer="There is no intracranial hemorrhage.", question_type="open"))
        return qa
    noun = "fracture" if fracture else "hemorrhage"
    qa += [
        dict(question=f"What type of {noun} is there, and on which side?",
             answer=f"There is a {finding.describe()}.", question_type="open"),
        dict(question=f"Where is the {noun}? Answer with a bounding box.", answer=None, question_type="rec",
             box=finding.box),
        dict(question="What is in the region {box}?", answer=f"A {finding.describe()}.", question_type="reg",
             box=finding.box),
        dict(question=f"Segment the {finding.kind if hemorrhage else 'fracture'} in this CT.",
             answer="It is [SEG].", question_type="seg", mask=True),
        dict(question=f"Please segment the abnormality on the {finding.side} side.",
             answer="Sure, it is [SEG].", question_type="refseg", mask=True),
    ]
    return qa


def generate_case(seed: int, shape=(32, 96, 96), normal_fraction: float = 1 / 3) -> PhantomCase:
    """One phantom case, deterministic per seed.

    Args:
        seed (`int`): the case's seed (its id is `phantom-{seed:06d}`).
        shape (`tuple[int, int, int]`, defaults to `(32, 96, 96)`): `(D, H, W)` voxels.
        normal_fraction (`float`, defaults to 1/3): probability that the case has no finding.
    """
    if min(shape) < 8:
        raise ValueError(f"A phantom needs at least 8 voxels per axis, got shape {tuple(shape)}")
    if not 0.0 <= normal_fraction <= 1.0:
        raise ValueError(f"normal_fraction must lie in [0, 1], got {normal_fraction}")
    rng = np.random.default_rng(seed)
    volume, finding = draw_case(shape, rng, normal_fraction)
    spacing = (5.0 * 32 / shape[0], 0.45 * 512 / shape[1], 0.45 * 512 / shape[2])
    return PhantomCase(
        case_id=f"phantom-{seed:06d}",
        volume=np.round(volume).astype(np.int16),
        spacing=tuple(round(s, 3) for s in spacing),
        finding=finding,
        report=write_report(finding, rng),
        qa=question_answers(finding, rng),
    )
