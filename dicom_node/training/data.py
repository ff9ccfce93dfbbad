"""Training data: a folder of PNG images and per-structure masks, its split, and its cache.

The layout is the one of ``../shared/data/jsrt``::

    DATA/images/<case>.png
    DATA/masks/<structure>/<case>.png     (0 or 255; masks of different structures may overlap)
    DATA/cases.csv                         (optional: case,finding; stratifies the split)

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
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch
from PIL import Image

from dicom_node.errors import InputError
from dicom_node.models.package import ColorMode, ModelPackage
from dicom_node.models.preprocess import Placement, prepare_image, to_input_grid

log = structlog.get_logger(__name__)

SPLIT_FILE = "split.json"
IMAGES_DIR = "images"
MASKS_DIR = "masks"
CASES_FILE = "cases.csv"


@dataclass(frozen=True)
class Split:
    """Case ids of the training and validation sets, and how they were drawn."""

    train: tuple[str, ...]
    validation: tuple[str, ...]
    seed: int
    validation_fraction: float
    stratified_by: str | None
    #: Cases held out of training and of every choice (3D data sets; empty for 2D folders).
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
    for structure in structures:
        folder = Path(data_dir) / MASKS_DIR / structure
        missing = [c for c in cases if not (folder / f"{c}.png").is_file()]
        if missing:
            raise InputError(
                f"{folder}: {len(missing)} of {len(cases)} masks missing (first: "
                f"{missing[0]}.png); every image needs a mask of every structure of the model"
            )
    return cases


def read_findings(data_dir: Path) -> dict[str, str]:
    """``case -> finding`` from ``cases.csv``, or an empty mapping when it is absent."""
    path = Path(data_dir) / CASES_FILE
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {row["case"]: row.get("finding", "") for row in csv.DictReader(f)}


def make_split(
    cases: list[str],
    findings: dict[str, str],
    *,
    validation_fraction: float = 0.2,
    seed: int = 0,
) -> Split:
    """Split ``cases`` into training and validation, stratified by finding, reproducibly.

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
    """
    if not 0.0 < validation_fraction < 1.0:
        raise InputError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if len(cases) < 2:
        raise InputError(f"need at least 2 cases to split, got {len(cases)}")
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
    for structure in structures:
        with Image.open(Path(data_dir) / MASKS_DIR / structure / f"{case}.png") as im:
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
