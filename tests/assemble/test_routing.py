from __future__ import annotations

from pathlib import Path

from dicom_node.assemble.routing import matches, routes_for
from dicom_node.config.sections import Route
from dicom_node.config.settings import load_settings
from dicom_node.send.delivery import backoff_s

CHEST = Route("chest", {"Modality": ("CR", "DX")}, Path("m"), ("pacs",))
AXIAL = Route("ct", {"Modality": ("CT",), "ImageType": ("AXIAL",)}, Path("m"), ("pacs",))


def test_match_any_value_case_insensitive() -> None:
    assert matches(CHEST, {"Modality": "DX"})
    assert matches(CHEST, {"Modality": "cr "})
    assert not matches(CHEST, {"Modality": "CT"})
    assert not matches(CHEST, {})


def test_multi_valued_attributes_match_a_component() -> None:
    assert matches(AXIAL, {"Modality": "CT", "ImageType": "ORIGINAL\\PRIMARY\\AXIAL"})
    assert not matches(AXIAL, {"Modality": "CT", "ImageType": "DERIVED\\SECONDARY\\LOCALIZER"})


def test_every_matching_route_gets_a_job() -> None:
    both = Route("all-dx", {"Modality": ("DX",)}, Path("m"), ("pacs",))
    assert [r.name for r in routes_for((CHEST, AXIAL, both), {"Modality": "DX"})] == [
        "chest",
        "all-dx",
    ]


def test_backoff_doubles_up_to_the_limit() -> None:
    assert [backoff_s(n, 2.0, 10.0) for n in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_empty_accepted_value_matches_an_absent_attribute() -> None:
    route = Route(
        "chest", {"Modality": ("DX",), "ViewPosition": ("PA", "AP", "")}, Path("m"), ("pacs",)
    )
    assert matches(route, {"Modality": "DX", "ViewPosition": "PA"})
    assert matches(route, {"Modality": "DX"})
    assert matches(route, {"Modality": "DX", "ViewPosition": " "})
    assert not matches(route, {"Modality": "DX", "ViewPosition": "LL"})
    assert not matches(route, {"ViewPosition": "PA"})  # Modality absent, "" not accepted


def test_default_route_takes_only_what_the_chest_model_is_valid_for() -> None:
    repo = Path(__file__).resolve().parents[2]
    routes = {r.name: r for r in load_settings(repo / "config" / "node.yaml").routes}
    route = routes["chest-xray"]
    assert route.model.resolve() == (repo / "config" / "models" / "cxr-anatomy").resolve()
    chest = {"Modality": "DX", "BodyPartExamined": "CHEST", "ViewPosition": "PA"}
    assert matches(route, chest)
    assert matches(route, {**chest, "ViewPosition": "AP"})
    assert matches(route, {"Modality": "CR"})  # an unlabelled film still goes to the model
    assert not matches(route, {**chest, "ViewPosition": "LL"})
    assert not matches(route, {**chest, "ViewPosition": "LATERAL"})
    assert not matches(route, {**chest, "BodyPartExamined": "HAND"})
    assert not matches(route, {**chest, "Modality": "CT"})


def test_default_breast_ultrasound_route_takes_breast_us_only() -> None:
    repo = Path(__file__).resolve().parents[2]
    routes = {r.name: r for r in load_settings(repo / "config" / "node.yaml").routes}
    route = routes["breast-us"]
    assert route.model.resolve() == (repo / "config" / "models" / "busi-lesion").resolve()
    assert matches(route, {"Modality": "US", "BodyPartExamined": "BREAST"})
    assert matches(route, {"Modality": "US", "BodyPartExamined": "breast"})
    assert matches(route, {"Modality": "US"})  # scanners that leave Body Part empty
    assert not matches(route, {"Modality": "US", "BodyPartExamined": "ABDOMEN"})
    assert not matches(route, {"Modality": "DX", "BodyPartExamined": "BREAST"})
    assert not matches(routes["chest-xray"], {"Modality": "US", "BodyPartExamined": "BREAST"})
