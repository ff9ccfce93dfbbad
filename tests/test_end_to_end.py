"""The whole node over real loopback associations: DCMTK storescu -> node -> DCMTK storescp.

The node runs as its own process (``dicom-node serve``), so these tests also prove it can be
killed with SIGKILL at awkward moments and restart without losing or duplicating anything.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from dicom_node.imaging.series import load_series
from dicom_node.models.inference import Segmenter
from dicom_node.outputs.seg import read_seg_masks, source_frame_keys
from dicom_node.package.manifest import load_package
from dicom_node.testing.dciodvfy import dciodvfy_errors
from tests.conftest import NodeProcess, StoreSCP, free_port, require_shared_data, storescu, wait_for
from tests.factories import (
    ACCESSION_NUMBER,
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    ct_series,
    jsrt_dx,
    jsrt_mask,
    write_files,
)
from tests.la_mri import dice

pytestmark = pytest.mark.peers

CHEST = ["right_lung", "left_lung", "heart", "right_clavicle", "left_clavicle"]
#: Dice between a returned SEG and the same model run in the test's process: same geometry.
SAME_DICE = 0.99


def results(scp: StoreSCP, n: int = 2, timeout_s: float = 90) -> dict[str, Path]:
    """Wait for ``n`` distinct output instances at the PACS; return Modality -> file."""

    def ready() -> dict[str, Path] | None:
        found = {}
        for path in scp.files():
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - storescp may still be writing it
                return None
            found[str(ds.SOPInstanceUID)] = path
        return found if len(found) >= n else None

    by_uid = wait_for(ready, timeout_s, f"{n} results at the PACS")
    return {str(dcmread(p, stop_before_pixels=True).Modality): p for p in by_uid.values()}


def test_dx_study_round_trip(
    tmp_path: Path,
    storescp: StoreSCP,
    node_factory: Callable[..., NodeProcess],
    random_package: Path,
) -> None:
    require_shared_data()
    metrics_port = free_port()
    node = node_factory(random_package, storescp.port, metrics_port=metrics_port).start()
    source = jsrt_dx("JPCLN001")
    files = write_files([source], tmp_path / "study")
    sent_at = time.monotonic()
    done = storescu(node.port, files)
    assert done.returncode == 0, done.stderr

    out = results(storescp)
    latency = time.monotonic() - sent_at
    assert set(out) == {"SEG", "SR"}
    for path in out.values():
        assert dciodvfy_errors(path) == [], path

    seg = dcmread(out["SEG"])
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [
        "Right lung",
        "Left lung",
        "Heart",
        "Right clavicle",
        "Left clavicle",
    ]
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    refs = [
        i.ReferencedSOPInstanceUID
        for s in seg.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    ]
    assert refs == [source.SOPInstanceUID]
    masks = read_seg_masks(seg, source_frame_keys([source]))
    assert masks.shape == (1, source.Rows, source.Columns, len(CHEST))
    # The SEG holds exactly what the same model makes of the same file in this process.
    meant = Segmenter(load_package(random_package)).segment(load_series(files))
    assert np.array_equal(masks, meant)
    sr = dcmread(out["SR"])
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert latency < 60

    # What an administrator's Prometheus sees.
    def scraped() -> str | None:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        return (
            text
            if 'dicom_node_sends_total{destination="pacs",outcome="done"} 2.0' in text
            else None
        )

    metrics = wait_for(scraped, 10, "delivered sends in the metrics")
    assert "dicom_node_instances_received_total 1.0" in metrics
    assert 'dicom_node_jobs_total{outcome="done",route="chest"} 1.0' in metrics
    assert 'dicom_node_jobs{state="done"} 1.0' in metrics
    assert 'dicom_node_associations_total{outcome="accepted"} 1.0' in metrics

    # No patient data in the operational log of the whole round trip, but in the audit trail.
    node.stop()
    log = node.log.read_text()
    assert "job.done" in log and "send.done" in log
    for secret in (PATIENT_NAME, "Doe", PATIENT_ID, PATIENT_BIRTH_DATE, ACCESSION_NUMBER):
        assert secret not in log, f"{secret!r} leaked into the operational log"
    audit = [json.loads(line) for line in (node.storage / "audit.jsonl").read_text().splitlines()]
    kinds = {(e["event_id"]["meaning"], e["action"]) for e in audit}
    assert ("DICOM Instances Transferred", "C") in kinds  # received
    assert ("DICOM Instances Accessed", "C") in kinds  # SEG + SR made
    assert ("DICOM Instances Transferred", "R") in kinds  # sent
    received = [e for e in audit if e["action"] == "C" and e["event_id"]["code"] == "110104"]
    assert [e["details"]["phase"] for e in received] == ["receiving", "association closed"]
    assert all(e["patient_id"] == PATIENT_ID for e in received)
    assert received[0]["calling_ae"] == "MODALITY"
    assert received[1]["details"]["instances"] == 1


def test_same_study_twice_gives_same_uids(
    tmp_path: Path,
    storescp: StoreSCP,
    node_factory: Callable[..., NodeProcess],
    random_package: Path,
) -> None:
    """A resend of the same study replaces: the outputs keep their SOP Instance UIDs."""
    node = node_factory(random_package, storescp.port).start()
    files = write_files(ct_series(n_slices=6), tmp_path / "ct")
    assert storescu(node.port, files).returncode == 0
    first = {dcmread(p).SOPInstanceUID for p in results(storescp).values()}
    for p in storescp.files():
        p.unlink()
    assert storescu(node.port, files).returncode == 0
    second = {dcmread(p).SOPInstanceUID for p in results(storescp).values()}
    assert first == second
    assert node.status()["instances"] == 6  # the resent instances replaced, not duplicated
    seg = dcmread(next(p for p in storescp.files() if dcmread(p).Modality == "SEG"))
    assert seg.NumberOfFrames >= 1
    assert all(dciodvfy_errors(p) == [] for p in storescp.files())


@pytest.mark.parametrize("syntax, flag", [(JPEGLSLossless, "-xt"), (JPEG2000Lossless, "-xv")])
def test_compressed_input(
    tmp_path: Path,
    storescp: StoreSCP,
    node_factory: Callable[..., NodeProcess],
    random_package: Path,
    syntax: str,
    flag: str,
) -> None:
    ds = jsrt_dx("JPCLN002") if _has_jsrt() else _synthetic_dx()
    ds.compress(syntax)
    files = write_files([ds], tmp_path / "study")
    node = node_factory(random_package, storescp.port).start()
    done = storescu(node.port, files, flag)
    assert done.returncode == 0, done.stderr
    stored = list((node.storage / "spool").rglob("*.dcm"))
    assert dcmread(stored[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    out = results(storescp)
    assert set(out) == {"SEG", "SR"}


def test_monochrome1_input(
    tmp_path: Path,
    storescp: StoreSCP,
    node_factory: Callable[..., NodeProcess],
    random_package: Path,
) -> None:
    ds = jsrt_dx("JPCLN003", monochrome1=True) if _has_jsrt() else _synthetic_dx(True)
    node = node_factory(random_package, storescp.port).start()
    assert storescu(node.port, write_files([ds], tmp_path / "s")).returncode == 0
    out = results(storescp)
    seg = dcmread(out["SEG"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ds.SeriesInstanceUID


def test_kill_while_study_waits(
    tmp_path: Path,
    storescp: StoreSCP,
    node_factory: Callable[..., NodeProcess],
    random_package: Path,
) -> None:
    """Killed after Success but before the series was complete: nothing is lost."""
    node = node_factory(random_package, storescp.port, release_grace_s=3).start()
    files = write_files(ct_series(n_slices=5), tmp_path / "ct")
    assert storescu(node.port, files).returncode == 0
    node.kill9()
    assert storescp.files() == []
    node.start()
    out = results(storescp)
    assert set(out) == {"SEG", "SR"}
    time.sleep(1.0)
    assert len(storescp.files()) == 2


def test_kill_while_job_runs(
    tmp_path: Path,
    storescp: StoreSCP,
    node_factory: Callable[..., NodeProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Killed in the middle of inference: the job runs again and sends one SEG and one SR."""
    from dicom_node.testing.random_package import make_random_package

    slow = tmp_path_factory.mktemp("slow") / "slow"
    make_random_package(slow, input_size=(512, 512), channels=(32, 64, 128, 256))
    node = node_factory(slow, storescp.port, release_grace_s=0.2).start()
    files = write_files(ct_series(n_slices=24, rows=128, cols=128), tmp_path / "ct")
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: node.status()["jobs"].get("running"), 60, "the job to run")
    node.kill9()
    assert storescp.files() == []
    node.start()
    out = results(storescp, timeout_s=180)
    assert set(out) == {"SEG", "SR"}
    jobs = node.status()["jobs"]
    assert jobs == {"done": 1}
    time.sleep(1.0)
    assert len({dcmread(p).SOPInstanceUID for p in storescp.files()}) == 2


def test_destination_down_then_up(
    tmp_path: Path,
    node_factory: Callable[..., NodeProcess],
    random_package: Path,
) -> None:
    port = free_port()
    node = node_factory(random_package, port).start()
    files = write_files(ct_series(n_slices=4), tmp_path / "ct")
    assert storescu(node.port, files).returncode == 0

    def retried() -> bool:
        dest = node.status()["destinations"].get("pacs", {})
        return "last_error" in dest

    wait_for(retried, 60, "a failed send attempt")
    scp = StoreSCP(tmp_path / "late-pacs", port).start()
    try:
        out = results(scp)
        assert set(out) == {"SEG", "SR"}
        wait_for(lambda: node.status()["sends"] == {"done": 2}, 30, "sends marked done")
    finally:
        scp.stop()


def _has_jsrt() -> bool:
    from tests.factories import JSRT

    return (JSRT / "images").is_dir()


def _synthetic_dx(monochrome1: bool = False):  # type: ignore[no-untyped-def]
    from tests.factories import dx_from_array

    yy, xx = np.mgrid[0:300, 0:260]
    chest = np.exp(-(((yy - 150) / 90) ** 2 + ((xx - 130) / 80) ** 2))
    return dx_from_array(chest, monochrome1=monochrome1)


def test_late_instance_reprocesses_and_supersedes(
    tmp_path: Path,
    storescp: StoreSCP,
    node_factory: Callable[..., NodeProcess],
    random_package: Path,
) -> None:
    """Default policy: a slice that arrives after the series ran makes new outputs that sit in
    the same SEG/SR series with new SOP Instance UIDs and reference every slice."""
    node = node_factory(random_package, storescp.port).start()
    ct = ct_series(n_slices=5, shuffle=False)
    files = write_files(ct, tmp_path / "ct")
    assert storescu(node.port, files[:4]).returncode == 0
    first = {m: dcmread(p) for m, p in results(storescp).items()}
    for p in storescp.files():
        p.unlink()
    assert storescu(node.port, files[4:]).returncode == 0
    second = {m: dcmread(p) for m, p in results(storescp).items()}
    for modality in ("SEG", "SR"):
        assert second[modality].SeriesInstanceUID == first[modality].SeriesInstanceUID
        assert second[modality].SOPInstanceUID != first[modality].SOPInstanceUID
    refs = {
        i.ReferencedSOPInstanceUID
        for s in second["SEG"].ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }
    assert refs == {ds.SOPInstanceUID for ds in ct}
    assert node.status()["jobs"] == {"done": 2}


DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "config" / "models" / "cxr-anatomy"


def test_default_model_on_a_real_radiograph(
    tmp_path: Path,
    storescp: StoreSCP,
    node_factory: Callable[..., NodeProcess],
) -> None:
    """The shipped model, over the network, on a held-out JSRT case (the first of the test
    part, which chose nothing) sent as MONOCHROME1 DX: the SEG lands on the expert masks (no
    flip, no shift), and the SR carries the areas and the cardiothoracic ratio."""
    require_shared_data()
    case = json.loads((DEFAULT_MODEL / "split.json").read_text())["test"][0]
    source = jsrt_dx(case, monochrome1=True)
    node = node_factory(DEFAULT_MODEL, storescp.port).start()
    files = write_files([source], tmp_path / "study")
    assert storescu(node.port, files).returncode == 0
    out = results(storescp)
    seg = dcmread(out["SEG"])
    masks = read_seg_masks(seg, source_frame_keys([source]))[0]
    for i, structure in enumerate(CHEST):
        expert = jsrt_mask(case, structure)
        jaccard = (masks[..., i] & expert).sum() / (masks[..., i] | expert).sum()
        # per case, not the means: 1.2.0 on this case: lungs 0.963 / 0.942, heart 0.828,
        # clavicles 0.895 / 0.862 (test/dicom_path.json). These bounds catch a left-right flip
        # (lungs near 0), not a shift: the expert lungs shifted by 20 px (7 mm) still score
        # 0.79-0.92 against themselves. The geometry is checked below.
        bound = 0.75 if "clavicle" in structure else 0.80 if structure == "heart" else 0.85
        assert jaccard > bound, (structure, jaccard)
    # The SEG lands where the same model, run in this process on the same file, puts each
    # structure (Dice >= SAME_DICE; other thread counts may round a few border pixels apart);
    # the same masks 5 px off along either axis do not.
    meant = Segmenter(load_package(DEFAULT_MODEL)).segment(load_series(files))[0]
    for i, structure in enumerate(CHEST):
        assert dice(masks[..., i], meant[..., i]) >= SAME_DICE, structure
        for axis in (0, 1):
            shifted = np.roll(masks[..., i], 5, axis=axis)
            assert dice(shifted, meant[..., i]) < SAME_DICE, (structure, axis)
    assert dciodvfy_errors(out["SEG"]) == [] and dciodvfy_errors(out["SR"]) == []

    sr = dcmread(out["SR"])
    values = {}
    for group in sr.ContentSequence:
        for item in group.get("ContentSequence", []):
            for leaf in item.get("ContentSequence", []):
                if leaf.ValueType == "NUM":
                    name = leaf.ConceptNameCodeSequence[0].CodeMeaning
                    unit = leaf.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue
                    values.setdefault((name, unit), []).append(
                        float(leaf.MeasuredValueSequence[0].NumericValue)
                    )
    assert len(values[("Area", "cm2")]) == 5
    expert_area = jsrt_mask(case, "right_lung").sum() * 0.35 * 0.35 / 100
    assert values[("Area", "cm2")][0] == pytest.approx(expert_area, rel=0.1)
    (ctr,) = values[("Cardiothoracic ratio", "{ratio}")]
    assert 0.3 < ctr < 0.7


def test_transfer_is_audited_before_the_association_ends(
    storescp: StoreSCP, node_factory: Callable[..., NodeProcess], random_package: Path
) -> None:
    """Killed mid-association: the instance answered Success is already in the audit trail."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    node = node_factory(random_package, storescp.port).start()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert assoc.send_c_store(ct_series(n_slices=1)[0]).Status == 0
    node.kill9()
    assoc.abort()
    audit = [json.loads(x) for x in (node.storage / "audit.jsonl").read_text().splitlines()]
    received = [e for e in audit if e["event_id"]["code"] == "110104" and e["action"] == "C"]
    assert [e["patient_id"] for e in received] == [PATIENT_ID]
    assert received[0]["details"]["phase"] == "receiving"


def test_concurrent_senders(
    tmp_path: Path,
    storescp: StoreSCP,
    node_factory: Callable[..., NodeProcess],
    random_package: Path,
) -> None:
    """Three modalities sending at once: every instance indexed, every series segmented."""
    from tests.conftest import storescu_at_once

    node = node_factory(random_package, storescp.port).start()
    series = [ct_series(n_slices=8, seed=i) for i in range(3)]
    batches = [write_files(s, tmp_path / f"ct{i}") for i, s in enumerate(series)]
    assert storescu_at_once(node.port, batches) == [0, 0, 0]
    found = results(storescp, n=6)
    assert len(found) == 2  # by modality: SEG and SR
    assert node.status()["instances"] == 24
    referenced = set()
    for path in storescp.files():
        ds = dcmread(path)
        if ds.Modality == "SEG":
            referenced.add(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    assert referenced == {s[0].SeriesInstanceUID for s in series}
