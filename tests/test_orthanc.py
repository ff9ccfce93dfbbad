"""The node against a real PACS: Orthanc 1.10 (Debian package) on loopback.

Orthanc holds a study, pushes it to the node (``POST /modalities/node/store``, a C-STORE from
Orthanc's SCU), and the node C-STOREs its SEG and SR back into the same study. Orthanc only
files them under that study when Patient ID and Study Instance UID match the source, so this
also checks that the outputs carry the source's patient and study modules.

Orthanc runs with its own JSON config in ``tmp_path``: no plugins (the Debian package's
``/etc/orthanc/orthanc.json`` loads those in ``/usr/share/orthanc/plugins``; a config of our own
that names no ``Plugins`` loads none), HTTP on loopback only, and stores only from the AE titles
it knows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO

from dicom_node.testing.random_package import CHEST_STRUCTURES, KNOWN_STRUCTURES
from tests.conftest import NodeProcess, free_port, wait_for
from tests.factories import JSRT, ct_series, jsrt_dx
from tests.orthanc import OrthancProcess

pytestmark = pytest.mark.peers

ORTHANC_AET = "ORTHANC"
NODE_AET = "DICOMNODE"


class Orthanc(OrthancProcess):
    """Orthanc as the PACS: no plugins, stores only from the node, which it knows as a modality."""

    def __init__(self, folder: Path, node_port: int) -> None:
        super().__init__(
            folder,
            {
                "Name": "dicom-node-tests",
                "Plugins": [],
                "DicomAet": ORTHANC_AET,
                "DicomCheckCalledAet": True,
                "DicomAlwaysAllowStore": False,  # only the modalities below may C-STORE
                "DicomModalities": {"node": [NODE_AET, "127.0.0.1", node_port]},
                "ConcurrentJobs": 1,
            },
        )
        self.node_port = node_port

    def ready(self) -> bool:
        return bool(self.get("/system")["DicomAet"] == ORTHANC_AET)

    def file(self, instance_id: str) -> Dataset:
        return dcmread(DicomBytesIO(self.request("GET", f"/instances/{instance_id}/file")))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One Orthanc for the module (its shutdown alone takes a few seconds)."""
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), node_port=free_port()).start()
    yield server
    server.stop()


def _encode(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_orthanc_runs_without_plugins(orthanc: Orthanc) -> None:
    """Our config, not Debian's: no system plugin is loaded."""
    assert "Loading plugin" not in orthanc.log()
    assert [p for p in orthanc.get("/plugins") if p != "explorer.js"] == []
    assert orthanc.get("/modalities") == ["node"]


def test_study_from_orthanc_gets_seg_and_sr_back(
    orthanc: Orthanc, node_factory: Callable[..., NodeProcess], random_package: Path
) -> None:
    node = node_factory(
        random_package,
        orthanc.dicom_port,
        port=orthanc.node_port,
        destinations={
            "orthanc": {"ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": orthanc.dicom_port}
        },
        routes=[
            {
                "name": "chest",
                "match": {"Modality": ["DX", "CT"]},
                "model": str(random_package),
                "send_to": ["orthanc"],
            }
        ],
    ).start()

    # A real radiograph when the shared data is there, else a small CT series.
    sources = [jsrt_dx("JPCLN001")] if (JSRT / "images").is_dir() else ct_series(n_slices=4)
    study_ids = {orthanc.post("/instances", _encode(ds))["ParentStudy"] for ds in sources}
    assert len(study_ids) == 1
    study_id = study_ids.pop()

    pushed = orthanc.post("/modalities/node/store", study_id.encode())
    assert pushed["FailedInstancesCount"] == 0, pushed
    assert pushed["InstancesCount"] == len(sources), pushed

    def outputs() -> dict[str, str] | None:
        series = orthanc.get(f"/studies/{study_id}/series")
        by_modality = {s["MainDicomTags"].get("Modality"): s for s in series}
        if not {"SEG", "SR"} <= set(by_modality):
            return None
        if any(by_modality[m]["Instances"] == [] for m in ("SEG", "SR")):
            return None
        return {m: by_modality[m]["Instances"][0] for m in ("SEG", "SR")}

    try:
        found = wait_for(outputs, 45, "a SEG and an SR series in Orthanc's study")
    except BaseException:
        print("node log:\n" + node.log.read_text()[-4000:])
        print("Orthanc log:\n" + orthanc.log())
        raise

    series = orthanc.get(f"/studies/{study_id}/series")
    assert sorted(s["MainDicomTags"]["Modality"] for s in series) == sorted(
        [sources[0].Modality, "SEG", "SR"]
    )

    seg = orthanc.file(found["SEG"])
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.PatientID == sources[0].PatientID
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [
        KNOWN_STRUCTURES[name]["name"] for name in CHEST_STRUCTURES
    ]
    referenced = seg.ReferencedSeriesSequence
    assert [r.SeriesInstanceUID for r in referenced] == [sources[0].SeriesInstanceUID]
    assert {i.ReferencedSOPInstanceUID for i in referenced[0].ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in sources
    }

    sr = orthanc.file(found["SR"])
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.PatientID == sources[0].PatientID
    evidence = {
        i.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence
