"""Fixtures of the viewer tests: Orthanc + DICOMweb, OHIF behind a same-origin server, Chromium.

One Orthanc, one web server and one browser serve the whole module; each test opens its own
page (a fresh tab) on its own study.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.viewer.judge import Affine
from tests.viewer.peers import (
    CHROMIUM_ARGS,
    DicomWebOrthanc,
    new_user_data_dir,
    require_chromium,
    require_ohif,
)
from tests.viewer.server import ViewerServer

#: Seconds OHIF may take for a step (first image, SEG load) on a loaded 2-core machine.
STEP_TIMEOUT_S = 60.0
VIEWPORT_SIZE = {"width": 1280, "height": 900}

_FIRST_VIEWPORT = "window.cornerstone.getRenderingEngines()[0].getViewports()[0]"


@pytest.fixture(scope="session")
def orthanc_dicomweb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomWebOrthanc]:
    server = DicomWebOrthanc(tmp_path_factory.mktemp("orthanc-dicomweb")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def viewer_server(orthanc_dicomweb: DicomWebOrthanc) -> Iterator[ViewerServer]:
    server = ViewerServer(require_ohif(), orthanc_dicomweb.http_port).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser_context(playwright_session: Any) -> Iterator[Any]:
    """A Chromium (Debian's) persistent context on a fresh profile, driven by Playwright."""
    context = playwright_session.chromium.launch_persistent_context(
        new_user_data_dir(),
        executable_path=require_chromium(),
        args=list(CHROMIUM_ARGS),
        headless=True,
        viewport=VIEWPORT_SIZE,
    )
    yield context
    context.close()


@dataclass
class Viewer:
    """One OHIF page, with what the tests read from it."""

    page: Any
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def wait(self, expression: str, what: str, timeout_s: float = STEP_TIMEOUT_S) -> Any:
        """Poll a JavaScript expression in the page until it is truthy (Playwright polls)."""
        try:
            return self.page.wait_for_function(expression, timeout=timeout_s * 1000).json_value()
        except Exception as error:  # Playwright's TimeoutError; say what did not happen
            raise AssertionError(
                f"OHIF: timed out after {timeout_s} s waiting for {what}; page errors: "
                f"{self.errors}; console tail: {self.console[-15:]}"
            ) from error

    def type_errors(self) -> list[str]:
        """TypeErrors the page threw or logged (OHIF logs the ones its components catch)."""
        return [line for line in [*self.errors, *self.console] if "TypeError" in line]

    def open_study(self, base_url: str, study_uid: str) -> None:
        self.page.goto(f"{base_url}/viewer?StudyInstanceUIDs={study_uid}")
        self.wait(
            f"() => window.cornerstone && window.cornerstone.getRenderingEngines().length > 0"
            f" && {_FIRST_VIEWPORT} && {_FIRST_VIEWPORT}.getCurrentImageId()"
            f" && {_FIRST_VIEWPORT}.getImageData()",
            "the first image",
        )

    def double_click_series(self, modality: str) -> None:
        """Double-click the series of ``modality`` in the study browser panel (as a user)."""
        self.page.get_by_text(modality, exact=True).first.dblclick()

    def accept_prompt(self, timeout_s: float = 15.0) -> bool:
        """Click "Yes" on OHIF's "open this segmentation/report?" prompt when it shows."""
        button = self.page.get_by_role("button", name=re.compile(r"^Yes$"))
        try:
            button.first.wait_for(state="visible", timeout=timeout_s * 1000)
        except Exception:  # noqa: BLE001 (Playwright's TimeoutError): no prompt shown
            return False
        button.first.click()
        return True

    def load_seg(self) -> str:
        """Open the study's SEG as a user does; returns the segmentation id once drawn."""
        self.double_click_series("SEG")
        self.accept_prompt()
        return str(
            self.wait(
                "() => { const r = window.cornerstoneTools.segmentation.state"
                f".getSegmentationRepresentations({_FIRST_VIEWPORT}.id)"
                ".filter(r => r.type === 'Labelmap'); return r.length && r[0].segmentationId; }",
                "the SEG's labelmap in the viewport",
            )
        )

    def set_segmentation_visible(self, segmentation_id: str, visible: bool) -> None:
        self.page.evaluate(
            "([id, visible]) => { const vp = " + _FIRST_VIEWPORT + ";"
            " window.cornerstoneTools.segmentation.config.visibility"
            ".setSegmentationRepresentationVisibility(vp.id, {segmentationId: id,"
            " type: 'Labelmap'}, visible); vp.render(); }",
            [segmentation_id, visible],
        )

    def show_image(self, sop_instance_uid: str) -> None:
        """Scroll the stack to the image ``sop_instance_uid``."""
        index = self.page.evaluate(
            "(uid) => { const vp = " + _FIRST_VIEWPORT + ";"
            " const i = vp.getImageIds().findIndex(id => id.includes('/instances/' + uid + '/'));"
            " if (i >= 0) { vp.setImageIdIndex(i); } return i; }",
            sop_instance_uid,
        )
        assert index >= 0, "the image is not in the viewport's stack"
        self.wait(
            f"() => {_FIRST_VIEWPORT}.getCurrentImageId().includes('/instances/"
            f"{sop_instance_uid}/')",
            "the stack to show the image",
        )

    def sr_annotations(self) -> list[tuple[str, int]]:
        """(tool name, number of points) of the SR annotations cornerstone holds."""
        return [
            (str(name), int(count))
            for name, count in self.page.evaluate(
                "() => window.cornerstoneTools.annotation.state.getAllAnnotations()"
                ".filter(a => a.metadata.toolName === 'DICOMSRDisplay')"
                ".map(a => [a.metadata.toolName, a.data.handles.points.length])"
            )
        ]

    def render(self) -> None:
        """Ask cornerstone to render the viewport again (image and annotations)."""
        self.page.evaluate(f"() => {_FIRST_VIEWPORT}.render()")

    def current_sop_instance_uid(self) -> str:
        image_id = str(self.page.evaluate(f"() => {_FIRST_VIEWPORT}.getCurrentImageId()"))
        match = re.search(r"/instances/([0-9.]+)/", image_id)
        assert match, image_id
        return match.group(1)

    def transform(self) -> Affine:
        """The viewport's image-to-canvas transform, from cornerstone's own functions."""
        points = self.page.evaluate(
            "() => { const cs = window.cornerstone; const vp = " + _FIRST_VIEWPORT + ";"
            " const id = vp.getCurrentImageId();"
            " const f = (x, y) => vp.worldToCanvas(cs.utilities.imageToWorldCoords(id, [x, y]));"
            " return [f(0, 0), f(1, 0), f(0, 1)]; }"
        )
        (x0, y0), (x1, y1), (x2, y2) = points
        return Affine(origin=(x0, y0), dcol=(x1 - x0, y1 - y0), drow=(x2 - x0, y2 - y0))

    def canvas_screenshot(self, different_from: np.ndarray | None = None) -> np.ndarray:
        """RGB pixels of the viewport's element (canvas and its SVG layers), once stable.

        Renders are asynchronous: screenshots are taken until two in a row are equal (and,
        with ``different_from``, differ from that one: the render asked for has happened).
        """
        from playwright.sync_api import Error as PlaywrightError

        deadline = time.monotonic() + STEP_TIMEOUT_S
        previous: np.ndarray | None = None
        while True:
            # Looked up each time: OHIF may replace the viewport's element while it renders.
            element = self.page.evaluate_handle(f"() => {_FIRST_VIEWPORT}.element")
            try:
                png = element.as_element().screenshot(animations="disabled")
            except PlaywrightError as exc:
                if "not attached" not in str(exc) or time.monotonic() > deadline:
                    raise
                previous = None
                continue
            pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            settled = previous is not None and np.array_equal(previous, pixels)
            if settled and (different_from is None or not np.array_equal(pixels, different_from)):
                return pixels
            if time.monotonic() > deadline:
                raise AssertionError("the viewport kept changing; no stable screenshot")
            previous = pixels


@pytest.fixture
def viewer(browser_context: Any) -> Iterator[Viewer]:
    page = browser_context.new_page()
    view = Viewer(page)
    page.on("console", lambda message: view.console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: view.errors.append(str(error)))
    yield view
    page.close()


def upload(orthanc: DicomWebOrthanc, files: list[Path]) -> None:
    for file in files:
        orthanc.upload(file)


def sr_polylines(sr: Any) -> list[tuple[str, np.ndarray]]:
    """The SCOORD POLYLINEs of an SR dataset that OHIF 3.13 draws: the first of each content
    item's children (OHIF draws one SCOORD per measurement group or numeric value), as (SOP
    Instance UID it is selected from, points ``(n, 2)`` in image coordinates)."""
    found: list[tuple[str, np.ndarray]] = []

    def walk(item: Any) -> None:
        first = True
        for child in item.get("ContentSequence", []):
            if child.ValueType == "SCOORD" and child.GraphicType == "POLYLINE" and first:
                first = False
                image = child.ContentSequence[0].ReferencedSOPSequence[0]
                points = np.asarray(child.GraphicData, dtype=float).reshape(-1, 2)
                found.append((str(image.ReferencedSOPInstanceUID), points))
            walk(child)

    walk(sr)
    return found
