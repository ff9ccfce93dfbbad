"""Model packages: a folder with ``model.yaml`` and weights, everything the node needs to run it.

A package says what it accepts (modalities, 2D or 3D), how its input is prepared (size or patch,
spacing, intensity normalisation), what it outputs (multi-label sigmoid or exclusive softmax),
and how each output channel is described in DICOM (label, coded category and type from
pydicom's code dictionaries, display colour, postprocessing). See ``docs/model-package.md``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.common.errors import ModelPackageError
from dicom_node.config import yamlfile
from dicom_node.package.orientation import parse_orientation

MODEL_FILE = "model.yaml"


class Activation(enum.Enum):
    """How network outputs become masks."""

    SIGMOID = "sigmoid"  # multi-label: one independent channel per structure, overlaps allowed
    SOFTMAX = "softmax"  # exclusive: channel 0 is background, channel i is structure i


class NetworkKind(enum.Enum):
    """What ``network`` in ``model.yaml`` names (``network.kind``)."""

    UNET = "unet"  # a MONAI UNet built from the other keys, weights a state_dict (default)
    TORCHSCRIPT = "torchscript"  # network.file: a TorchScript module (torch.jit.save)
    ONNX = "onnx"  # network.file: an ONNX graph, run with onnxruntime
    #: a U-Net over an EfficientNet-Lite0 encoder (dicom_node.models.efficientnet_lite), weights
    #: a state_dict; ``kind`` stays in :attr:`ModelPackage.network` for its builder
    EFFICIENTNET_LITE0_UNET = "efficientnet-lite0-unet"


class NormalizationKind(enum.Enum):
    """Intensity normalisation applied before the network (``input.normalization.kind``)."""

    PERCENTILE = "percentile"  # clip to [lower, upper] percentiles, scale to [0, 1]
    WINDOW = "window"  # clip to center +- width / 2, scale to [0, 1]
    ZSCORE = "zscore"  # subtract mean, divide by standard deviation


class ColorMode(enum.Enum):
    """What the network sees of each pixel (``input.color``)."""

    GRAY = "gray"  # one channel: modality values, or the luminance of colour images
    RGB = "rgb"  # three channels R, G, B in 0..255 (grayscale images repeat their value)


class Postprocess(enum.Enum):
    """Per-structure postprocessing steps (``structures[].postprocess``)."""

    LARGEST_COMPONENT = "largest_component"
    FILL_HOLES = "fill_holes"


class Measurement(enum.Enum):
    """Measurements the SR reports (``measurements``)."""

    AREA = "area"  # per structure, 2D images, cm2
    VOLUME = "volume"  # per structure, 3D series, ml
    #: per structure, 2D images, mm: the longest diameter and the longest diameter
    #: perpendicular to it (breast lesions, as radiologists measure them)
    DIAMETERS = "diameters"
    CARDIOTHORACIC_RATIO = "cardiothoracic_ratio"  # needs heart and both lungs


@dataclass(frozen=True)
class Normalization:
    kind: NormalizationKind
    lower: float = 0.5
    upper: float = 99.5
    center: float = 0.0
    width: float = 1.0


@dataclass(frozen=True)
class Structure:
    """One output channel of the model and its DICOM segment description."""

    label: str  # machine name, e.g. "right_lung"
    name: str  # Segment Label (0062,0005), e.g. "Right lung"
    category: Code  # Segmented Property Category Code Sequence (0062,0003)
    type: Code  # Segmented Property Type Code Sequence (0062,000F)
    type_modifier: Code | None  # Segmented Property Type Modifier Code Sequence (0062,0011)
    color_rgb: tuple[int, int, int]
    postprocess: tuple[Postprocess, ...] = ()
    #: Anatomic Region Sequence (0008,2218) of the segment, e.g. SCT Breast for a breast lesion
    anatomic_region: Code | None = None


@dataclass(frozen=True)
class Applicability:
    """What a model is valid for (``applicability``); an empty tuple accepts anything.

    Attributes
    ----------
    views
        View Position (0018,5101) values, e.g. ``("PA", "AP")``.
    body_parts
        Body Part Examined (0018,0015) values, e.g. ``("CHEST",)``.
    species
        Patient Species Description (0010,2201) values; ``"human"`` stands for human patients
        (images without species attributes, or Homo sapiens).
    """

    views: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    species: tuple[str, ...] = ()


#: The one input role of a package without ``inputs`` (and of a route without ``inputs``).
DEFAULT_ROLE = "image"


@dataclass(frozen=True)
class InputSpec:
    """One input of the model (``inputs[]``): a named role, one channel group of the network.

    Attributes
    ----------
    role
        The role name, e.g. ``t1``; routes fill it with a series of the case.
    required
        False: the case may lack this role; its channel(s) are then zeros (after
        normalisation), as the model must have been trained to expect.
    """

    role: str
    required: bool = True


@dataclass(frozen=True)
class Refinement:
    """A crop stage of a 2D package (``refine:`` in ``model.yaml``): each of ``structures``
    found by the package's network is run again by the crop network of ``package`` on a
    square crop around it (:mod:`dicom_node.models.refine`), at a finer scale.

    Attributes
    ----------
    structures
        Labels of the parent package refined by this stage, one crop each.
    package
        The crop network's package, a sub-folder of the parent: 2D, sigmoid, one structure.
    mirror
        Those of ``structures`` whose crops are mirrored left-right before the crop network
        and back after (so that one network serves a left and a right structure).
    margin
        The square crop's side is the found mask's longer box side times ``1 + 2 * margin``.
    """

    structures: tuple[str, ...]
    package: ModelPackage
    mirror: tuple[str, ...] = ()
    margin: float = 0.15


@dataclass(frozen=True)
class ModelPackage:
    """A validated model package. Construct with :func:`load_package`."""

    path: Path
    name: str
    version: str
    dims: int  # 2: runs per image/slice, batched; 3: runs on volumes by sliding window
    modalities: tuple[str, ...]
    input_size: tuple[int, ...]  # 2D: (rows, cols) of the network input; 3D: patch (z, y, x)
    spacing_mm: tuple[float, ...] | None  # 3D: resample to this (z, y, x) spacing first
    normalization: Normalization
    activation: Activation
    threshold: float
    network: dict[str, Any]  # keyword arguments of monai.networks.nets.UNet (less dims/ch)
    weights: Path
    structures: tuple[Structure, ...]
    measurements: tuple[Measurement, ...] = ()
    #: 2D models: Patient Orientation (0020,0020) the model was trained in, e.g. ("L", "F");
    #: projection images are brought to it before inference. None: images used as stored.
    orientation: tuple[str, str] | None = None
    applicability: Applicability = field(default_factory=Applicability)
    description: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    color: ColorMode = ColorMode.GRAY  # input.color: gray (1 channel) or rgb (3 channels)
    #: output.min_confidence: a structure found on an image whose mean probability inside its
    #: final mask is below this is dropped (not found); None keeps everything. Chosen on the
    #: validation cases (training.evaluate.select_min_confidence).
    min_confidence: float | None = None
    #: output.min_area_fraction: a structure found on an image whose final mask covers less
    #: than this fraction of the image is dropped (not found); None keeps everything. Chosen
    #: on the validation cases with min_confidence (training.evaluate.select_min_confidence).
    min_area_fraction: float | None = None
    #: output.flip_tta: 2D models: the probabilities are the mean of the image's and of its
    #: left-right mirror's (test-time augmentation; chosen on the validation cases).
    flip_tta: bool = False
    #: output.min_presence: networks with an image-level presence head
    #: (``network.presence_head``): a structure whose presence probability on an image is below
    #: this is not found there (its mask is empty); None: no gate. Chosen on the validation
    #: cases (training.evaluate.select_output_rules).
    min_presence: float | None = None
    #: ``inputs``: the roles in channel order; without it one required role ``image``.
    inputs: tuple[InputSpec, ...] = (InputSpec(DEFAULT_ROLE),)
    #: ``reference``: the role whose grid the others are resampled onto and the SEG is on.
    reference: str = DEFAULT_ROLE
    #: ``registered``: the site guarantees the inputs are registered (patient coordinates
    #: agree) even without a shared Frame of Reference UID (0020,0052).
    registered: bool = False
    #: ``network.kind``: a MONAI UNet (``weights`` its state_dict), or a TorchScript or ONNX
    #: file (``network.file``, then ``weights`` is that file and ``network`` is empty).
    network_kind: NetworkKind = NetworkKind.UNET
    #: ``refine``: 2D models: crop stages run after the network (see :class:`Refinement`).
    refine: tuple[Refinement, ...] = ()

    @property
    def roles(self) -> tuple[str, ...]:
        """The input role names in channel order."""
        return tuple(spec.role for spec in self.inputs)

    @property
    def channels_per_input(self) -> int:
        """Network channels of each input: 3 for ``input.color: rgb``, else 1."""
        return 3 if self.color is ColorMode.RGB else 1

    @property
    def in_channels(self) -> int:
        """Input channels of the network: one group of :attr:`channels_per_input` per role."""
        return len(self.inputs) * self.channels_per_input

    @property
    def out_channels(self) -> int:
        n = len(self.structures)
        return n + 1 if self.activation is Activation.SOFTMAX else n


def resolve_code(value: Any, key: str) -> Code:
    """Return a :class:`Code` from ``"SCT.Lung"`` (pydicom's dictionaries) or a mapping.

    A mapping is ``{value: ..., scheme: ..., meaning: ...}``.
    """
    if isinstance(value, str):
        scheme, _, keyword = value.partition(".")
        try:
            return getattr(getattr(codes, scheme), keyword)  # type: ignore[no-any-return]
        except AttributeError as exc:
            raise ModelPackageError(
                f"{key}: {value!r} is not in pydicom's code dictionaries; use SCHEME.Keyword "
                "(e.g. SCT.Lung) or {value, scheme, meaning}"
            ) from exc
    if isinstance(value, dict) and {"value", "scheme", "meaning"} <= value.keys():
        return Code(str(value["value"]), str(value["scheme"]), str(value["meaning"]))
    raise ModelPackageError(
        f"{key}: expected SCHEME.Keyword or {{value, scheme, meaning}}, got {value!r}"
    )


def _require(doc: dict[str, Any], key: str, where: str) -> Any:
    if key not in doc:
        raise ModelPackageError(f"{where}: missing key {key!r}")
    return doc[key]


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ModelPackageError(f"{key}: expected a mapping, got {value!r}")
    return value


def _float(doc: dict[str, Any], name: str, default: float, key: str) -> float:
    value = doc.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelPackageError(f"{key}.{name}: expected a number, got {value!r}")
    return float(value)


def _enum(cls: type[enum.Enum], value: Any, key: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in cls)
        raise ModelPackageError(f"{key}: {value!r} is not one of {allowed}") from None


def _structure(doc: Any, index: int, where: str) -> Structure:
    key = f"{where}: structures[{index}]"
    if not isinstance(doc, dict):
        raise ModelPackageError(f"{key}: expected a mapping, got {doc!r}")
    color = doc.get("color", [255, 0, 0])
    if (
        not isinstance(color, list)
        or len(color) != 3
        or not all(isinstance(c, int) and 0 <= c <= 255 for c in color)
    ):
        raise ModelPackageError(f"{key}.color: expected [r, g, b] in 0..255, got {color!r}")
    modifier = doc.get("type_modifier")
    region = doc.get("anatomic_region")
    return Structure(
        label=str(_require(doc, "label", key)),
        name=str(doc.get("name", doc["label"])),
        category=resolve_code(_require(doc, "category", key), f"{key}.category"),
        type=resolve_code(_require(doc, "type", key), f"{key}.type"),
        type_modifier=None if modifier is None else resolve_code(modifier, f"{key}.type_modifier"),
        color_rgb=(color[0], color[1], color[2]),
        postprocess=tuple(
            _enum(Postprocess, p, f"{key}.postprocess") for p in doc.get("postprocess", [])
        ),
        anatomic_region=(
            None if region is None else resolve_code(region, f"{key}.anatomic_region")
        ),
    )


def parse_structure(doc: Any, index: int, where: str) -> Structure:
    """One entry of ``structures`` (also of a foreign model's mapping), validated; errors
    name ``where: structures[index]``."""
    return _structure(doc, index, where)


def parse_applicability(doc: dict[str, Any], where: str) -> Applicability:
    """``applicability`` of ``doc`` (``model.yaml`` or a foreign model's mapping)."""
    return _applicability(doc, where)


def _orientation(inp: dict[str, Any], dims: int, where: str) -> tuple[str, str] | None:
    value = inp.get("orientation")
    if value is None:
        return None
    key = f"{where}: input.orientation"
    if dims != 2:
        raise ModelPackageError(f"{key}: only 2D models of projection images have one; remove it")
    letters = (
        parse_orientation(value)
        if isinstance(value, list) and all(isinstance(v, str) and len(v) == 1 for v in value)
        else None
    )
    if letters is None:
        raise ModelPackageError(
            f"{key}: expected two Patient Orientation (0020,0020) letters of A, P, R, L, H, F "
            f"on different body axes, e.g. [L, F] for a PA chest radiograph, got {value!r}"
        )
    return letters


def _strings(doc: dict[str, Any], name: str, key: str) -> tuple[str, ...]:
    value = doc.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ModelPackageError(
            f"{key}.{name}: expected a list of non-empty strings, got {value!r}"
        )
    return tuple(v.strip().upper() for v in value)


def _applicability(doc: dict[str, Any], where: str) -> Applicability:
    key = f"{where}: applicability"
    app = _mapping(doc.get("applicability") or {}, key)
    unknown = set(app) - {"views", "body_parts", "species"}
    if unknown:
        raise ModelPackageError(
            f"{key}: unknown key(s) {', '.join(sorted(unknown))}; known: views, body_parts, species"
        )
    return Applicability(
        views=_strings(app, "views", key),
        body_parts=_strings(app, "body_parts", key),
        species=tuple(s.lower() for s in _strings(app, "species", key)),
    )


_ROLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


def _inputs(doc: dict[str, Any], where: str) -> tuple[tuple[InputSpec, ...], str, bool]:
    """``inputs``, ``reference`` and ``registered`` of ``model.yaml``."""
    registered = doc.get("registered", False)
    if not isinstance(registered, bool):
        raise ModelPackageError(f"{where}: registered: expected true or false, got {registered!r}")
    value = doc.get("inputs")
    if value is None:
        specs: tuple[InputSpec, ...] = (InputSpec(DEFAULT_ROLE),)
    else:
        if not isinstance(value, list) or not value:
            raise ModelPackageError(
                f"{where}: inputs: expected a non-empty list of {{role: name}} in channel "
                f"order, got {value!r}"
            )
        found = []
        for i, item in enumerate(value):
            key = f"{where}: inputs[{i}]"
            item = _mapping(item, key)
            unknown = set(item) - {"role", "required"}
            if unknown:
                raise ModelPackageError(
                    f"{key}: unknown key(s) {', '.join(sorted(unknown))}; known: role, required"
                )
            role = item.get("role")
            if not isinstance(role, str) or not _ROLE_RE.match(role):
                raise ModelPackageError(
                    f"{key}.role: expected a name of letters, digits, _ or - starting with a "
                    f"letter (e.g. t1c), got {role!r}"
                )
            required = item.get("required", True)
            if not isinstance(required, bool):
                raise ModelPackageError(f"{key}.required: expected true or false, got {required!r}")
            found.append(InputSpec(role, required))
        specs = tuple(found)
    roles = [spec.role for spec in specs]
    if len(set(roles)) != len(roles):
        raise ModelPackageError(f"{where}: inputs: role names must be unique, got {roles}")
    reference = doc.get("reference", roles[0])
    if reference not in roles:
        raise ModelPackageError(
            f"{where}: reference: {reference!r} is not one of the inputs' roles {roles}"
        )
    if not next(s for s in specs if s.role == reference).required:
        raise ModelPackageError(
            f"{where}: reference: the reference input {reference!r} must be required; the SEG "
            "is made on its grid"
        )
    return specs, str(reference), registered


def _network(
    doc: dict[str, Any], folder: Path, where: str, network_file: Path | None
) -> tuple[NetworkKind, dict[str, Any], Path]:
    """``network`` (its kind and UNet arguments) and the weights file of ``model.yaml``."""
    network = doc.get("network", {})
    if not isinstance(network, dict):
        raise ModelPackageError(f"{where}: network: expected a mapping")
    network = dict(network)
    default_kind = "unet"
    if network_file is not None:
        default_kind = "onnx" if network_file.suffix.lower() == ".onnx" else "torchscript"
    kind = _enum(NetworkKind, network.pop("kind", default_kind), f"{where}: network.kind")
    if kind in (NetworkKind.UNET, NetworkKind.EFFICIENTNET_LITE0_UNET):
        if "file" in network:
            raise ModelPackageError(
                f"{where}: network.file: only for kind torchscript or onnx; a unet's weights "
                "are the key weights"
            )
        weights = folder / str(doc.get("weights", "model.pt"))
        if not weights.is_file():
            raise ModelPackageError(f"{where}: weights: file {weights} does not exist")
        if kind is not NetworkKind.UNET:
            network = {"kind": kind.value, **network}
        return kind, network, weights
    name = network.pop("file", None)
    if network:
        raise ModelPackageError(
            f"{where}: network: unknown key(s) {', '.join(sorted(network))} for kind "
            f"{kind.value}; known: kind, file"
        )
    if network_file is not None:
        return kind, {}, network_file
    if not isinstance(name, str) or not name:
        raise ModelPackageError(
            f"{where}: network.file: missing; the {kind.value} file of the model, e.g. "
            f"{'model.onnx' if kind is NetworkKind.ONNX else 'model.ts'}"
        )
    weights = folder / name
    if not weights.is_file():
        raise ModelPackageError(f"{where}: network.file: file {weights} does not exist")
    return kind, {}, weights


def load_package(path: Path | str, network_file: Path | None = None) -> ModelPackage:
    """Read and validate the model package in folder ``path``.

    Parameters
    ----------
    path
        The package folder (with ``model.yaml``), or a descriptor file in ``model.yaml``'s
        format (the descriptor of a TorchScript or ONNX file, see
        :func:`dicom_node.models.formats.detect_format`).
    network_file
        A TorchScript or ONNX file the descriptor describes: it is the network, whatever
        ``network.file`` says; ``network.kind`` defaults to the file's kind (``.onnx``:
        onnx, else torchscript).

    Raises
    ------
    ModelPackageError
        When ``model.yaml`` or the weights are missing, or a key is invalid; the message names
        the file and the key.
    """
    given = Path(path)
    folder, model_file = (given.parent, given) if given.is_file() else (given, given / MODEL_FILE)
    if not model_file.is_file():
        raise ModelPackageError(
            f"{folder}: no {MODEL_FILE}; a model package is a folder with {MODEL_FILE} and weights"
        )
    where = str(model_file)
    try:
        doc = yamlfile.safe_load(model_file.read_text())
    except yaml.YAMLError as exc:
        raise ModelPackageError(f"{where}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ModelPackageError(f"{where}: expected a mapping at the top level")

    dims = _require(doc, "dims", where)
    if isinstance(dims, bool) or dims not in (2, 3):
        raise ModelPackageError(f"{where}: dims: must be 2 or 3, got {dims!r}")
    inp = _mapping(_require(doc, "input", where), f"{where}: input")
    size = _require(inp, "size", f"{where}: input")
    if (
        not isinstance(size, list)
        or len(size) != dims
        or not all(isinstance(s, int) and s > 0 for s in size)
    ):
        raise ModelPackageError(
            f"{where}: input.size: expected {dims} positive integers, got {size!r}"
        )
    spacing = inp.get("spacing_mm")
    if spacing is not None and (
        not isinstance(spacing, list)
        or len(spacing) != dims
        or not all(isinstance(s, int | float) and s > 0 for s in spacing)
    ):
        raise ModelPackageError(
            f"{where}: input.spacing_mm: expected {dims} positive numbers, got {spacing!r}"
        )
    norm_key = f"{where}: input.normalization"
    norm_doc = _mapping(inp.get("normalization", {"kind": "percentile"}), norm_key)
    norm = Normalization(
        kind=_enum(NormalizationKind, norm_doc.get("kind"), f"{norm_key}.kind"),
        lower=_float(norm_doc, "lower", 0.5, norm_key),
        upper=_float(norm_doc, "upper", 99.5, norm_key),
        center=_float(norm_doc, "center", 0.0, norm_key),
        width=_float(norm_doc, "width", 1.0, norm_key),
    )
    color = _enum(ColorMode, inp.get("color", "gray"), f"{where}: input.color")
    if color is ColorMode.RGB and dims != 2:
        raise ModelPackageError(f"{where}: input.color: rgb is supported for 2D models only")
    out = _mapping(doc.get("output", {}), f"{where}: output")
    threshold = _float(out, "threshold", 0.5, f"{where}: output")
    if not 0.0 < threshold < 1.0:
        raise ModelPackageError(f"{where}: output.threshold: must be in (0, 1), got {threshold}")
    min_confidence = out.get("min_confidence")
    if min_confidence is not None and (
        isinstance(min_confidence, bool)
        or not isinstance(min_confidence, int | float)
        or not 0.0 <= min_confidence < 1.0
    ):
        raise ModelPackageError(
            f"{where}: output.min_confidence: a mean probability in [0, 1), got {min_confidence!r}"
        )
    min_area = out.get("min_area_fraction")
    if min_area is not None and (
        isinstance(min_area, bool) or not isinstance(min_area, int | float) or not 0 <= min_area < 1
    ):
        raise ModelPackageError(
            f"{where}: output.min_area_fraction: a fraction of the image in [0, 1), got "
            f"{min_area!r}"
        )
    flip_tta = out.get("flip_tta", False)
    if not isinstance(flip_tta, bool) or (flip_tta and dims != 2):
        raise ModelPackageError(
            f"{where}: output.flip_tta: true or false, and true only for 2D models; got "
            f"{flip_tta!r}"
        )
    min_presence = out.get("min_presence")
    if min_presence is not None and (
        isinstance(min_presence, bool)
        or not isinstance(min_presence, int | float)
        or not 0.0 < min_presence < 1.0
    ):
        raise ModelPackageError(
            f"{where}: output.min_presence: a probability in (0, 1), got {min_presence!r}"
        )
    if min_presence is not None and out.get("activation", "sigmoid") != "sigmoid":
        raise ModelPackageError(
            f"{where}: output.min_presence is for sigmoid outputs (one gate per structure)"
        )
    structures_doc = _require(doc, "structures", where)
    if not isinstance(structures_doc, list) or not structures_doc:
        raise ModelPackageError(f"{where}: structures: expected a non-empty list")
    structures = tuple(_structure(s, i, where) for i, s in enumerate(structures_doc))
    labels = [s.label for s in structures]
    if len(set(labels)) != len(labels):
        raise ModelPackageError(f"{where}: structures: labels must be unique, got {labels}")
    network_kind, network, weights = _network(doc, folder, where, network_file)
    modalities = doc.get("modalities", [])
    if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
        raise ModelPackageError(f"{where}: modalities: expected a list of strings")
    measurements = tuple(
        _enum(Measurement, m, f"{where}: measurements") for m in doc.get("measurements", [])
    )
    inputs, reference, registered = _inputs(doc, where)
    refine = _refine(doc.get("refine"), folder, where, dims, labels, out)
    if refine and (len(inputs) != 1 or any(r.package.color is not color for r in refine)):
        raise ModelPackageError(
            f"{where}: refine: crop stages need a one-input package and the same input.color"
        )
    return ModelPackage(
        path=folder,
        name=str(_require(doc, "name", where)),
        version=str(_require(doc, "version", where)),
        dims=dims,
        modalities=tuple(modalities),
        input_size=tuple(size),
        spacing_mm=None if spacing is None else tuple(float(s) for s in spacing),
        normalization=norm,
        activation=_enum(
            Activation, out.get("activation", "sigmoid"), f"{where}: output.activation"
        ),
        threshold=threshold,
        min_confidence=None if min_confidence is None else float(min_confidence),
        min_area_fraction=None if min_area is None else float(min_area),
        flip_tta=flip_tta,
        min_presence=None if min_presence is None else float(min_presence),
        network=network,
        weights=weights,
        structures=structures,
        measurements=measurements,
        orientation=_orientation(inp, dims, where),
        applicability=_applicability(doc, where),
        description=str(doc.get("description", "")),
        metrics=dict(_mapping(doc.get("metrics") or {}, f"{where}: metrics")),
        color=color,
        inputs=inputs,
        reference=reference,
        registered=registered,
        network_kind=network_kind,
        refine=refine,
    )


def _refine(
    value: Any, folder: Path, where: str, dims: int, labels: list[str], out: dict[str, Any]
) -> tuple[Refinement, ...]:
    """The ``refine:`` list of a package (see :class:`Refinement`), validated."""
    if value is None:
        return ()
    key = f"{where}: refine"
    if not isinstance(value, list) or not value:
        raise ModelPackageError(f"{key}: expected a non-empty list of crop stages")
    if dims != 2 or out.get("activation", "sigmoid") != "sigmoid":
        raise ModelPackageError(f"{key}: crop stages are for 2D sigmoid models")
    stages: list[Refinement] = []
    refined: list[str] = []
    for i, item in enumerate(value):
        stage_key = f"{key}[{i}]"
        item = _mapping(item, stage_key)
        unknown = sorted(set(item) - {"structures", "package", "mirror", "margin"})
        if unknown:
            raise ModelPackageError(
                f"{stage_key}: unknown keys {unknown}; known: margin, mirror, package, structures"
            )
        structures = item.get("structures")
        if not isinstance(structures, list) or not structures:
            raise ModelPackageError(f"{stage_key}.structures: a non-empty list of labels")
        bad = [s for s in structures if s not in labels]
        if bad:
            raise ModelPackageError(
                f"{stage_key}.structures: {bad} are not structures of this package ({labels})"
            )
        refined.extend(structures)
        mirror = item.get("mirror", [])
        if not isinstance(mirror, list) or not set(mirror) <= set(structures):
            raise ModelPackageError(f"{stage_key}.mirror: a list of this stage's structures")
        margin = item.get("margin", 0.15)
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin <= 2:
            raise ModelPackageError(f"{stage_key}.margin: a number in [0, 2], got {margin!r}")
        name = item.get("package")
        sub_folder = (folder / str(name)).resolve()
        inside = sub_folder.is_relative_to(folder.resolve()) and sub_folder != folder.resolve()
        if not isinstance(name, str) or not inside:
            raise ModelPackageError(
                f"{stage_key}.package: the name of a sub-folder of the package, got {name!r}"
            )
        sub = load_package(sub_folder)
        if sub.dims != 2 or sub.activation is not Activation.SIGMOID or len(sub.structures) != 1:
            raise ModelPackageError(
                f"{stage_key}.package: {sub_folder} must be a 2D sigmoid package with one "
                f"structure (it has dims {sub.dims}, {len(sub.structures)} structures)"
            )
        if sub.refine or len(sub.inputs) != 1:
            raise ModelPackageError(
                f"{stage_key}.package: a crop stage has one input and no crop stages of its own"
            )
        stages.append(
            Refinement(
                structures=tuple(structures),
                package=sub,
                mirror=tuple(mirror),
                margin=float(margin),
            )
        )
    if len(set(refined)) != len(refined):
        raise ModelPackageError(f"{key}: each structure may be refined by one stage only")
    return tuple(stages)
