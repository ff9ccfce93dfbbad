"""Training data: a folder of PNG images and per-structure masks, its split, and its cache.

The layout is the one of ``../shared/data/jsrt``::

    DATA/images/<case>.png
    DATA/masks/<structure>/<case>.png     (0 or 255; masks of different structures may overlap)
    DATA/cases.csv                         (optional: case,finding; stratifies the split)

or, for a model of one structure, the flat layout of ``../shared/data/busi``::

    DATA/images/<case>.png
    DATA/masks/<case>.png                  (0 or 255; empty for an image without the structure)

Without ``cases.csv`` the finding can come from the case id (``finding_pattern``, a regular
expression whose first group is the finding, e.g. ``^([a-z]+)_`` for ``benign_001``).

Besides training and validation, a fixed ``test`` part (``test_fraction``, drawn first, per
stratum, with its own seed) is kept out of training and out of every choice (epoch, threshold,
postprocessing), for a final figure measured once (e.g. through the DICOM path).

Cases are split by case id (one radiograph per patient in JSRT) with a fixed seed, stratified by
the ``finding`` column when ``cases.csv`` is present, so that nodule and non-nodule radiographs
are in the same proportion in training and validation. The split is written into the model
package (``split.json``) so that ``evaluate`` and the tests use the same held-out cases.

Images are prepared once with :func:`dicom_node.models.preprocess.prepare_image`, the same
function the node runs on incoming DICOM images, and cached in memory (inputs as float16, masks
as uint8 on the network's input grid).
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch
from PIL import Image

from dicom_node.common.errors import InputError
from dicom_node.models.preprocess import Placement, prepare_image, to_input_grid
from dicom_node.package.manifest import ColorMode, ModelPackage

log = structlog.get_logger(__name__)

SPLIT_FILE = "split.json"
IMAGES_DIR = "images"
MASKS_DIR = "masks"
CASES_FILE = "cases.csv"


@dataclass(frozen=True)
class Split:
    """Case ids of the training, validation and (optional) test sets, and how they were drawn."""

    train: tuple[str, ...]
    validation: tuple[str, ...]
    seed: int
    validation_fraction: float
    stratified_by: str | None
    #: Cases held out of training and of every choice (empty when the
    #: config asks for no test part).
    test: tuple[str, ...] = ()
    test_seed: int | None = None
    test_fraction: float = 0.0

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "seed": self.seed,
            "validation_fraction": self.validation_fraction,
            "stratified_by": self.stratified_by,
            "train": list(self.train),
            "validation": list(self.validation),
        }
        if self.test:
            doc.update(
                test_seed=self.test_seed, test_fraction=self.test_fraction, test=list(self.test)
            )
        return doc

    def write(self, folder: Path) -> Path:
        """Write the split as ``split.json`` in ``folder`` (a model package)."""
        path = folder / SPLIT_FILE
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path


def read_split(folder: Path) -> Split:
    """Read ``split.json`` of the model package in ``folder``.

    Raises
    ------
    InputError
        When the package has no split (it was not trained by ``dicom-node train``).
    """
    path = Path(folder) / SPLIT_FILE
    if not path.is_file():
        raise InputError(
            f"{path}: no split in this model package; evaluate on all cases with --all-cases"
        )
    doc = json.loads(path.read_text())
    return Split(
        train=tuple(doc["train"]),
        validation=tuple(doc["validation"]),
        seed=int(doc["seed"]),
        validation_fraction=float(doc["validation_fraction"]),
        stratified_by=doc.get("stratified_by"),
        test=tuple(doc.get("test", ())),
        test_seed=doc.get("test_seed"),
        test_fraction=float(doc.get("test_fraction", 0.0)),
    )


def mask_path(data_dir: Path, structure: str, case: str, flat: bool = False) -> Path:
    """The mask file of ``structure`` in ``case``: ``masks/<structure>/<case>.png``, or
    ``masks/<case>.png`` in the flat layout of a one-structure data set."""
    masks = Path(data_dir) / MASKS_DIR
    return masks / f"{case}.png" if flat else masks / structure / f"{case}.png"


def is_flat(data_dir: Path, structures: list[str]) -> bool:
    """Whether ``data_dir`` has the flat mask layout (one structure, ``masks/<case>.png``)."""
    masks = Path(data_dir) / MASKS_DIR
    return len(structures) == 1 and not (masks / structures[0]).is_dir()


def list_cases(data_dir: Path, structures: list[str]) -> list[str]:
    """Case ids that have an image and a mask of every structure, sorted.

    Raises
    ------
    InputError
        When the folder does not have the expected layout, or a mask is missing.
    """
    images = Path(data_dir) / IMAGES_DIR
    if not images.is_dir():
        raise InputError(
            f"{data_dir}: no {IMAGES_DIR}/ folder; expected {IMAGES_DIR}/<case>.png and "
            f"{MASKS_DIR}/<structure>/<case>.png"
        )
    cases = sorted(p.stem for p in images.glob("*.png"))
    if not cases:
        raise InputError(f"{images}: no PNG images")
    flat = is_flat(data_dir, structures)
    for structure in structures:
        folder = mask_path(data_dir, structure, "x", flat).parent
        missing = [c for c in cases if not mask_path(data_dir, structure, c, flat).is_file()]
        if missing:
            raise InputError(
                f"{folder}: {len(missing)} of {len(cases)} masks missing (first: "
                f"{missing[0]}.png); every image needs a mask of every structure of the model"
            )
    return cases


def read_findings(
    data_dir: Path, pattern: str | None = None, cases: list[str] | None = None
) -> dict[str, str]:
    """``case -> finding`` from ``cases.csv``; without it, from the case ids of ``cases`` with
    the regular expression ``pattern`` (its first group); else an empty mapping.

    Raises
    ------
    InputError
        When ``pattern`` does not match a case id.
    """
    path = Path(data_dir) / CASES_FILE
    if not path.is_file():
        if pattern is None or cases is None:
            return {}
        regex = re.compile(pattern)
        out: dict[str, str] = {}
        for case in cases:
            found = regex.search(case)
            if found is None or not found.groups():
                raise InputError(
                    f"case {case!r}: finding_pattern {pattern!r} does not match it (or has no "
                    "group); every case id needs a finding, or give a cases.csv"
                )
            out[case] = found.group(1)
        return out
    with path.open(newline="") as f:
        return {row["case"]: row.get("finding", "") for row in csv.DictReader(f)}


def make_split(
    cases: list[str],
    findings: dict[str, str],
    *,
    validation_fraction: float = 0.2,
    seed: int = 0,
    test_fraction: float = 0.0,
    test_seed: int | None = None,
) -> Split:
    """Split ``cases`` into training, validation and optionally test, stratified by finding,
    reproducibly.

    Parameters
    ----------
    cases
        Case ids; one case per patient (JSRT has one radiograph per patient).
    findings
        ``case -> finding`` used to stratify; cases without one form their own stratum.
    validation_fraction
        Fraction of every stratum held out, rounded to the nearest case (at least one case
        in all).
    seed
        Seed of the shuffle.
    test_fraction, test_seed
        Fraction of every stratum kept apart first as the test part (0: none), with its own
        seed (default: ``seed``), so that the test cases do not move when the validation
        fraction or seed change; validation is then drawn from the remaining cases.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise InputError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if not 0.0 <= test_fraction < 1.0 or validation_fraction + test_fraction >= 1.0:
        raise InputError(
            f"test_fraction must be in [0, 1) and leave training cases, got {test_fraction}"
        )
    if len(cases) < 2:
        raise InputError(f"need at least 2 cases to split, got {len(cases)}")
    test: list[str] = []
    if test_fraction > 0:
        test_rng = random.Random(seed if test_seed is None else test_seed)
        by_finding: dict[str, list[str]] = defaultdict(list)
        for case in sorted(cases):
            by_finding[findings.get(case, "")].append(case)
        for key in sorted(by_finding):
            members = by_finding[key]
            test_rng.shuffle(members)
            test.extend(members[: round(len(members) * test_fraction)])
    test_set = set(test)
    cases = [c for c in cases if c not in test_set]
    strata: dict[str, list[str]] = defaultdict(list)
    for case in sorted(cases):
        strata[findings.get(case, "")].append(case)
    rng = random.Random(seed)
    validation: list[str] = []
    for key in sorted(strata):
        members = strata[key]
        rng.shuffle(members)
        validation.extend(members[: round(len(members) * validation_fraction)])
    if not validation:  # tiny data sets: hold out at least one case
        validation.append(sorted(cases)[rng.randrange(len(cases))])
    val_set = set(validation)
    return Split(
        train=tuple(c for c in sorted(cases) if c not in val_set),
        validation=tuple(sorted(val_set)),
        seed=seed,
        validation_fraction=validation_fraction,
        stratified_by="finding" if findings else None,
        test=tuple(sorted(test_set)),
        test_seed=(seed if test_seed is None else test_seed) if test_set else None,
        test_fraction=test_fraction,
    )


def check_cases(data_dir: Path, cases: list[str], structures: list[str]) -> None:
    """Refuse, before any inference, a case whose image or mask is missing or whose mask is
    not the size of its image (read from the PNG headers only).

    Raises
    ------
    InputError
        Naming the first such case and its file (and both sizes for a mask of another size).
    """
    flat = is_flat(data_dir, structures)
    for case in cases:
        image = Path(data_dir) / IMAGES_DIR / f"{case}.png"
        if not image.is_file():
            raise InputError(f"case {case}: image {image} not found")
        with Image.open(image) as im:
            size = im.size
        for structure in structures:
            mask = mask_path(data_dir, structure, case, flat)
            if not mask.is_file():
                raise InputError(
                    f"case {case}: mask {mask} not found; every image needs a mask of every "
                    "structure of the model"
                )
            with Image.open(mask) as im:
                if im.size != size:
                    raise InputError(
                        f"case {case}: mask {mask} is {im.size[0]} x {im.size[1]} pixels but "
                        f"its image {image} is {size[0]} x {size[1]}; a mask must be the size of "
                        "its image"
                    )


def read_image(data_dir: Path, case: str, color: ColorMode = ColorMode.GRAY) -> np.ndarray:
    """The image of ``case``: ``(rows, cols)`` grayscale (colour PNGs converted to luminance),
    or ``(rows, cols, 3)`` RGB for ``color`` rgb (a package's ``input.color``)."""
    with Image.open(Path(data_dir) / IMAGES_DIR / f"{case}.png") as im:
        if color is ColorMode.RGB:
            return np.asarray(im.convert("RGB"))
        return np.asarray(im.convert("L") if im.mode not in ("L", "I", "I;16") else im)


def read_masks(data_dir: Path, case: str, structures: list[str]) -> np.ndarray:
    """Masks of ``case`` as a boolean array (S, rows, cols), in the order of ``structures``."""
    out = []
    flat = is_flat(data_dir, structures)
    for structure in structures:
        with Image.open(mask_path(data_dir, structure, case, flat)) as im:
            out.append(np.asarray(im.convert("L")) > 127)
    return np.stack(out)


def masks_to_input(masks: np.ndarray, placement: Placement) -> np.ndarray:
    """Bring masks (S, rows, cols) onto the network's input grid exactly as their image was.

    The padding and resizing are the image's (:func:`to_input_grid` with the image's
    placement); the soft result is thresholded at 0.5. Returns uint8 (S, in_rows, in_cols).
    """
    soft = to_input_grid(masks.astype(np.float32), placement, pad_value=0.0)
    return (soft >= 0.5).astype(np.uint8)


class CachedCases(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Prepared inputs and masks of some cases, in memory, with optional augmentation.

    Parameters
    ----------
    data_dir
        The PNG folder.
    cases
        Case ids to load.
    package
        The model package being trained (input size, normalisation, structures).
    transform
        Called on ``{"image": (1, H, W), "label": (S, H, W)}`` float tensors, or None.
    """

    def __init__(
        self,
        data_dir: Path,
        cases: list[str] | tuple[str, ...],
        package: ModelPackage,
        transform: object | None = None,
    ) -> None:
        labels = [s.label for s in package.structures]
        self.cases = list(cases)
        self.transform = transform
        images, masks = [], []
        for case in self.cases:
            image = read_image(data_dir, case, package.color)
            prepared, placement = prepare_image(image, package)
            images.append(prepared.astype(np.float16))
            masks.append(masks_to_input(read_masks(data_dir, case, labels), placement))
        stacked = np.stack(images)  # (N, H, W) gray or (N, 3, H, W) rgb
        self.images = stacked[:, None] if stacked.ndim == 3 else stacked  # (N, C, H, W) f16
        self.masks = np.stack(masks)  # (N, S, H, W) uint8
        log.info("cases cached", n_cases=len(self.cases), input_size=list(package.input_size))

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {
            "image": torch.from_numpy(self.images[index].astype(np.float32)),
            "label": torch.from_numpy(self.masks[index].astype(np.float32)),
        }
        if self.transform is not None:
            item = self.transform(item)  # type: ignore[operator]
            item = {k: torch.as_tensor(v) for k, v in item.items() if k in ("image", "label")}
        return item
