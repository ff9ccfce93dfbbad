"""Multi-input models: a study of two MR series through a 2-input package as one case.

The series are made from a real left-atrium LGE-MRI volume (shared/data/la-mri): the volume
itself, and a second "sequence" of it with another intensity mapping (inverted, gamma) in a
separate series of the same study and Frame of Reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.app.node import Node
from dicom_node.common.errors import InputError, ModelPackageError
from dicom_node.common.output_kinds import OutputKind
from dicom_node.config.settings import parse_settings
from dicom_node.imaging.resample import resample_onto
from dicom_node.imaging.series import load_series
from dicom_node.models.inference import Segmenter
from dicom_node.models.preprocess import prepare_image
from dicom_node.package.manifest import InputSpec, load_package
from dicom_node.testing.dciodvfy import dciodvfy_errors, dciodvfy_path
from dicom_node.testing.random_package import make_random_package
from dicom_node.work.segment import segment_case, segment_series, write_outputs
from tests.conftest import (
    REQUIRE_PEERS,
    StoreSCP,
    free_port,
    require_shared_data,
    storescu,
    wait_for,
)
from tests.factories import la_mri_cases, la_mri_volume, mr_series, write_files

SLICES = 12  # a slab of the volume keeps the test quick; every slice is still real data


@pytest.fixture(scope="module")
def volume() -> tuple[np.ndarray, tuple[float, float, float]]:
    require_shared_data("la-mri")
    cases = la_mri_cases()
    data, spacing = la_mri_volume(cases[0])
    middle = data.shape[0] // 2
    return data[middle - SLICES // 2 : middle + SLICES // 2], spacing


def second_sequence(data: np.ndarray) -> np.ndarray:
    """Another contrast of the same anatomy: inverted, then a gamma of 0.5 (0..1000)."""
    inverted = (data.max() - data) / max(float(data.max()), 1.0)
    return 1000.0 * inverted**0.5


class Study:
    """Two MR series of one study: ``lge`` (reference) and ``dark`` (the second sequence)."""

    def __init__(
        self,
        root: Path,
        data: np.ndarray,
        spacing: tuple[float, float, float],
        *,
        same_frame_of_reference: bool = True,
    ) -> None:
        study = generate_uid()
        frame = generate_uid()
        self.lge = mr_series(
            data, spacing_mm=spacing, study_uid=study, frame_of_reference_uid=frame
        )
        self.dark = mr_series(
            second_sequence(data),
            spacing_mm=spacing,
            study_uid=study,
            frame_of_reference_uid=frame if same_frame_of_reference else generate_uid(),
            series_number=2,
            description="dark blood 3D",
        )
        self.paths = {
            "lge": write_files(self.lge, root / "lge"),
            "dark": write_files(self.dark, root / "dark"),
        }


@pytest.fixture(scope="module")
def two_input_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "la-2ch"
    make_random_package(
        folder,
        dims=3,
        structures=("heart",),
        modalities=("MR",),
        name="random-la-2ch",
        inputs=("lge", "dark"),
        spacing_mm=(2.5, 2.5, 2.5),
    )
    return folder


def series_uids_in_evidence(ds: object) -> set[str]:
    return {
        str(series.SeriesInstanceUID)
        for study in ds.CurrentRequestedProcedureEvidenceSequence  # type: ignore[attr-defined]
        for series in study.ReferencedSeriesSequence
    }


def image_library_uids(sr: object) -> set[str]:
    """SOP Instance UIDs of the images in the report's Image Library (TID 1600)."""
    found = set()
    for item in sr.ContentSequence:  # type: ignore[attr-defined]
        if item.ConceptNameCodeSequence[0].CodeValue != "111028":  # DCM Image Library
            continue
        for group in item.ContentSequence:
            for entry in group.ContentSequence:
                if entry.ValueType == "IMAGE":
                    found.add(str(entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    return found


def test_two_series_of_one_study_go_through_a_two_input_package(
    tmp_path: Path,
    volume: tuple[np.ndarray, tuple[float, float, float]],
    two_input_package: Path,
) -> None:
    study = Study(tmp_path / "in", *volume)
    package = load_package(two_input_package)
    assert package.roles == ("lge", "dark") and package.in_channels == 2
    segmenter = Segmenter(package, torch.device("cpu"))
    (result,) = segment_case(study.paths, segmenter, (OutputKind.SEG, OutputKind.SR))
    lge_uid, dark_uid = study.lge[0].SeriesInstanceUID, study.dark[0].SeriesInstanceUID
    assert result.inputs == {"lge": lge_uid, "dark": dark_uid}

    seg, sr = result.seg, result.sr
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [lge_uid]
    derived = {
        src.ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
        for src in frame.DerivationImageSequence[0].SourceImageSequence
    }
    assert derived <= {ds.SOPInstanceUID for ds in study.lge}
    assert seg.FrameOfReferenceUID == study.lge[0].FrameOfReferenceUID

    assert series_uids_in_evidence(sr) == {lge_uid, dark_uid, seg.SeriesInstanceUID}
    every_input = {ds.SOPInstanceUID for ds in (*study.lge, *study.dark)}
    assert image_library_uids(sr) == every_input

    written = write_outputs([result], tmp_path / "out")
    if dciodvfy_path() is None:
        if REQUIRE_PEERS:
            pytest.fail("dciodvfy is not installed; `make peers` installs dicom3tools")
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    for output in written:
        assert dciodvfy_errors(output.path) == [], output.path.name

    # Deterministic from the case: the same inputs give the same UIDs; another mapping of
    # the same series to roles is another case.
    (again,) = segment_case(study.paths, segmenter, (OutputKind.SEG,))
    assert again.seg.SOPInstanceUID == seg.SOPInstanceUID
    assert again.seg.SeriesInstanceUID == seg.SeriesInstanceUID
    swapped = {"lge": study.paths["dark"], "dark": study.paths["lge"]}
    (other,) = segment_case(swapped, segmenter, (OutputKind.SEG,))
    assert other.seg.SeriesInstanceUID != seg.SeriesInstanceUID


def test_another_frame_of_reference_fails_with_what_to_do(
    tmp_path: Path,
    volume: tuple[np.ndarray, tuple[float, float, float]],
    two_input_package: Path,
) -> None:
    study = Study(tmp_path / "in", *volume, same_frame_of_reference=False)
    segmenter = Segmenter(load_package(two_input_package), torch.device("cpu"))
    with pytest.raises(InputError) as caught:
        segment_case(study.paths, segmenter)
    message = str(caught.value)
    assert "inputs lge and dark" in message
    assert "Frame of Reference UID (0020,0052)" in message
    assert "registered: true" in message
    assert str(study.lge[0].PatientID) not in message


def test_registered_package_accepts_another_frame_of_reference(
    tmp_path: Path, volume: tuple[np.ndarray, tuple[float, float, float]]
) -> None:
    study = Study(tmp_path / "in", *volume, same_frame_of_reference=False)
    package = make_random_package(
        tmp_path / "model",
        dims=3,
        structures=("heart",),
        modalities=("MR",),
        inputs=("lge", "dark"),
        registered=True,
        spacing_mm=(2.5, 2.5, 2.5),
    )
    (result,) = segment_case(study.paths, Segmenter(package, torch.device("cpu")), ("seg",))
    assert result.seg.ReferencedSeriesSequence[0].SeriesInstanceUID == (
        study.lge[0].SeriesInstanceUID
    )


class Spy(torch.nn.Module):
    """Records the network input of every forward pass, then runs the network."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().cpu())
        return self.network(x)  # type: ignore[no-any-return]


@pytest.fixture
def spied(tmp_path: Path) -> Iterator[tuple[Segmenter, Spy]]:
    package = make_random_package(
        tmp_path / "model",
        structures=("heart",),
        modalities=("MR",),
        inputs=("lge", {"role": "dark", "required": False}),
    )
    segmenter = Segmenter(package, torch.device("cpu"))
    spy = Spy(segmenter.network)
    segmenter.network = spy
    yield segmenter, spy


def test_channels_in_package_order_and_missing_optional_role_is_zeros(
    tmp_path: Path,
    volume: tuple[np.ndarray, tuple[float, float, float]],
    spied: tuple[Segmenter, Spy],
) -> None:
    segmenter, spy = spied
    study = Study(tmp_path / "in", *volume)
    segment_case(study.paths, segmenter, ("seg",))
    both = torch.cat(spy.inputs)
    assert both.shape[1] == 2
    # Each channel is its series prepared alone, as a one-input package would (each role
    # normalised on its own), in the package's order: lge, then dark.
    one_input = replace(segmenter.package, inputs=(InputSpec("image"),), reference="image")
    for channel, role in enumerate(("lge", "dark")):
        series = load_series(study.paths[role])
        expected = np.stack([prepare_image(frame, one_input)[0] for frame in series.pixels])
        np.testing.assert_allclose(both[:, channel].numpy(), expected, atol=1e-5)
    spy.inputs.clear()
    segment_case({"lge": study.paths["lge"]}, segmenter, ("seg",))
    alone = torch.cat(spy.inputs)
    assert torch.equal(alone[:, 1], torch.zeros_like(alone[:, 1]))
    torch.testing.assert_close(alone[:, 0], both[:, 0])


def test_roles_must_be_the_package_roles(
    tmp_path: Path,
    volume: tuple[np.ndarray, tuple[float, float, float]],
    spied: tuple[Segmenter, Spy],
) -> None:
    segmenter, _ = spied
    study = Study(tmp_path / "in", *volume)
    with pytest.raises(InputError, match="needs input\\(s\\) lge"):
        segment_case({"dark": study.paths["dark"]}, segmenter)
    with pytest.raises(InputError, match="t2 are not inputs of model .* roles are lge, dark"):
        segment_case({**study.paths, "t2": study.paths["dark"]}, segmenter)
    # The one-input shorthand fills the reference role; the optional one is then zeros.
    (result,) = segment_series(study.paths["lge"], segmenter, ("seg",))
    assert result.inputs == {"lge": study.lge[0].SeriesInstanceUID}


def test_package_inputs_are_validated(tmp_path: Path) -> None:
    make_random_package(tmp_path / "m", inputs=("t1", "t1c"), reference="t1c")
    assert load_package(tmp_path / "m").reference == "t1c"
    model = tmp_path / "m" / "model.yaml"
    text = model.read_text()
    for bad, message in [
        ("reference: flair", "reference: 'flair' is not one of the inputs' roles"),
        ("registered: 'yes'", "registered: expected true or false"),
    ]:
        model.write_text(text.replace("reference: t1c", bad))
        with pytest.raises(ModelPackageError, match=message):
            load_package(tmp_path / "m")
    model.write_text(text.replace("role: t1c", "role: t1"))
    with pytest.raises(ModelPackageError, match="role names must be unique"):
        load_package(tmp_path / "m")


def physical_resample(
    data: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    new_spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    direction: tuple[float, ...],
    size: tuple[int, int, int],
) -> np.ndarray:
    """``data`` (on a grid at the origin, identity direction) sampled on another grid: the
    ground truth a DICOM series of that grid would hold."""
    image = sitk.GetImageFromArray(data)
    image.SetSpacing(spacing[::-1])
    out = sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, origin, new_spacing[::-1], direction, 0.0
    )
    return sitk.GetArrayFromImage(out)


def test_resampling_puts_the_secondary_input_in_place(
    tmp_path: Path, volume: tuple[np.ndarray, tuple[float, float, float]]
) -> None:
    """A secondary series with another spacing, origin and a reversed row direction (its
    pixels stored mirrored) comes back onto the reference grid within a voxel: the error is
    smallest at no shift among shifts of up to 2 voxels on every axis."""
    data, spacing = volume
    study, frame = generate_uid(), generate_uid()
    reference = load_series(
        write_files(
            mr_series(data, spacing_mm=spacing, study_uid=study, frame_of_reference_uid=frame),
            tmp_path / "ref",
        )
    )
    new_spacing = (1.1, 0.9, 0.8)  # z, y, x
    z, y, x = (n * s for n, s in zip(data.shape, spacing, strict=True))
    size = (int(x / new_spacing[2]) + 4, int(y / new_spacing[1]) + 4, int(z / new_spacing[0]) + 4)
    # Rows run toward -x (mirrored), columns toward +y, so slices go toward -z.
    origin = (x + 1.3, -1.7, z + 0.9)
    direction = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    values = physical_resample(
        data, spacing, new_spacing=new_spacing, origin=origin, direction=direction, size=size
    )
    secondary = load_series(
        write_files(
            mr_series(
                values,
                spacing_mm=new_spacing,
                study_uid=study,
                frame_of_reference_uid=frame,
                origin_mm=origin,
                orientation=(-1, 0, 0, 0, 1, 0),
                series_number=2,
            ),
            tmp_path / "sec",
        )
    )
    assert secondary.shape != reference.shape
    back = resample_onto(secondary.pixels, secondary, reference, default=float("nan"), role="dark")
    assert back.shape == reference.shape
    inner = (slice(2, -2),) * 3
    ref, got = reference.pixels[inner], back[inner]
    assert not np.isnan(got).any()

    def error(dz: int, dy: int, dx: int) -> float:
        shifted = np.roll(reference.pixels, (dz, dy, dx), axis=(0, 1, 2))[inner]
        return float(np.mean(np.abs(shifted - got)))

    best = min(
        ((dz, dy, dx) for dz in range(-2, 3) for dy in range(-2, 3) for dx in range(-2, 3)),
        key=lambda s: error(*s),
    )
    assert best == (0, 0, 0)
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.9
    # A mirrored result would be far off: the direction cosines were honoured.
    assert error(0, 0, 0) < 0.5 * float(np.mean(np.abs(ref - ref[:, :, ::-1])))


def test_one_input_outputs_keep_their_uids(tmp_path: Path, random_package: Path) -> None:
    """A one-input case derives its UIDs from its series alone, as before cases had roles."""
    from dicom_node.common.uids import output_uids
    from tests.factories import ct_series

    ct = ct_series(n_slices=3)
    paths = write_files(ct, tmp_path / "ct")
    package = load_package(random_package)
    (result,) = segment_case({"image": paths}, Segmenter(package), ("seg",))
    expected = output_uids(
        ct[0].SeriesInstanceUID,
        package.name,
        package.version,
        "seg",
        [ds.SOPInstanceUID for ds in ct],
    )
    assert (result.seg.SeriesInstanceUID, result.seg.SOPInstanceUID) == expected
    assert dcmread(write_outputs([result], tmp_path / "out")[0].path).Modality == "SEG"


@pytest.mark.peers
def test_a_two_series_study_runs_as_one_case_through_the_node(
    tmp_path: Path,
    volume: tuple[np.ndarray, tuple[float, float, float]],
    two_input_package: Path,
    storescp: StoreSCP,
) -> None:
    """Both series by C-STORE to a running node with a study route of two roles: one case, one
    job; the SEG at the PACS is on the reference series, the SR references both."""
    study = Study(tmp_path / "in", *volume)
    settings = parse_settings(
        {
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "storage_dir": str(tmp_path / "var"),
            "stable_after_s": 60,
            "release_grace_s": 0.5,
            "device": "cpu",
            "destinations": {
                "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": storescp.port}
            },
            "routes": [
                {
                    "name": "la-2ch",
                    "trigger": "study",
                    "model": str(two_input_package),
                    "inputs": [
                        {"role": "lge", "select": {"SeriesDescription": ["*LGE*"]}},
                        {"role": "dark", "select": {"SeriesDescription": ["*dark*"]}},
                    ],
                    "send_to": ["pacs"],
                }
            ],
        }
    )
    node = Node(settings)
    node.start()
    try:
        for role in ("dark", "lge"):  # the secondary first: arrival order does not matter
            sent = storescu(settings.port, study.paths[role])
            assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(storescp.files()) >= 2, 300, "SEG and SR at the PACS")
        (job,) = node.db.jobs()
        lge_uid, dark_uid = study.lge[0].SeriesInstanceUID, study.dark[0].SeriesInstanceUID
        assert node.db.job_inputs(job["id"]) == {"lge": lge_uid, "dark": dark_uid}
    finally:
        node.stop()
    received = {str(ds.Modality): ds for ds in (dcmread(p) for p in storescp.files())}
    seg, sr = received["SEG"], received["SR"]
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [lge_uid]
    assert series_uids_in_evidence(sr) == {lge_uid, dark_uid, seg.SeriesInstanceUID}
