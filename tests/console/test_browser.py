"""The web console in headless Chromium (Debian's, driven by Playwright) on a real node.

A node process with the console on, users added with ``dicom-node console user add`` (the
password on standard input), a destination that is down, and one CT study C-STOREd by DCMTK
``storescu``. In the browser: a wrong password is refused; the viewer sees the case appear,
its thumbnail (judged pixel by pixel against the SEG in the outbox) and the failed send with
its reason, but has no retry button and a forged retry is refused; the admin presses Retry
after DCMTK ``storescp`` came up, and the results are delivered.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from dicom_node.console.thumbnail import ALPHA, PALETTE, scale_of
from dicom_node.outputs.seg import read_seg_masks, source_frame_keys
from dicom_node.testing.random_package import make_random_package
from tests.conftest import REPO, NodeProcess, StoreSCP, free_port, storescu, wait_for
from tests.factories import ct_series, write_files
from tests.test_end_to_end import results
from tests.viewer.peers import CHROMIUM_ARGS, new_user_data_dir, require_chromium

pytestmark = [pytest.mark.peers, pytest.mark.viewer, pytest.mark.slow]

USERS = {"alice": ("admin", "alice-secret-1"), "victor": ("viewer", "victor-secret-1")}
STEP_S = 60.0


@pytest.fixture
def browser(playwright_session: Any) -> Iterator[Any]:
    context = playwright_session.chromium.launch_persistent_context(
        new_user_data_dir(),
        executable_path=require_chromium(),
        args=list(CHROMIUM_ARGS),
        headless=True,
    )
    yield context
    context.close()


def add_user(config: Path, name: str) -> None:
    role, password = USERS[name]
    subprocess.run(
        [sys.executable, "-m", "dicom_node", "console", "user", "add", name, "--role", role]
        + ["--config", str(config)],
        input=password + "\n",
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )


def sign_in(page: Any, base: str, name: str, password: str | None = None) -> None:
    page.goto(f"{base}/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password or USERS[name][1])
    page.click("button[type=submit]")


def until_shown(page: Any, url: str, selector: str, what: str) -> None:
    """Reload ``url`` until ``selector`` is on the page (the console does not push)."""

    def shown() -> bool:
        page.goto(url)
        return bool(page.locator(selector).count())

    wait_for(shown, STEP_S, what)


def thumbnail_pixels(page: Any) -> np.ndarray:
    """RGB pixels of the page's thumbnail as the browser decoded it (drawn into a canvas; the
    console's Content-Security-Policy allows no fetch from scripts)."""
    width, height, data = page.evaluate(
        "() => { const i = document.getElementById('thumbnail'); "
        "const c = document.createElement('canvas'); c.width = i.naturalWidth; "
        "c.height = i.naturalHeight; const g = c.getContext('2d'); g.drawImage(i, 0, 0); "
        "const d = g.getImageData(0, 0, c.width, c.height).data; let s = ''; "
        "for (let k = 0; k < d.length; k++) s += String.fromCharCode(d[k]); "
        "return [c.width, c.height, btoa(s)]; }"
    )
    rgba = np.frombuffer(base64.b64decode(data), dtype=np.uint8).reshape(height, width, 4)
    return rgba[..., :3].copy()


def judge_thumbnail(rgb: np.ndarray, seg_path: Path, source_files: list[Path]) -> int:
    """Check the strip against the SEG: gray exactly where no structure is, a structure's
    palette colour where only it is. Returns the number of masked thumbnail pixels."""
    seg = pydicom.dcmread(seg_path)
    sources = sorted((pydicom.dcmread(p) for p in source_files), key=lambda d: d.InstanceNumber)
    masks = read_seg_masks(seg, source_frame_keys(sources))
    shown = [i for i in range(len(sources)) if masks[i].any()]
    assert shown, "the SEG shows no structure: nothing to judge"
    up, _ = scale_of(*masks.shape[1:3])
    tile = masks.shape[1] * up
    masked = 0
    for n, i in enumerate(shown):
        part = rgb[:, n * (tile + 4) : n * (tile + 4) + tile].astype(int)
        m = np.repeat(np.repeat(masks[i], up, axis=0), up, axis=1)  # (rows, cols, segments)
        gray = (part[..., 0] == part[..., 1]) & (part[..., 1] == part[..., 2])
        anything = m.any(axis=-1)
        assert np.array_equal(gray, ~anything), f"tile {n}: gray pixels do not match the masks"
        only = m.sum(axis=-1) == 1
        for s in range(m.shape[-1]):
            where = only & m[..., s]
            want = np.asarray(PALETTE[s % len(PALETTE)]) * ALPHA
            diff_rg = part[..., 0] - part[..., 1]
            diff_gb = part[..., 1] - part[..., 2]
            assert (np.abs(diff_rg[where] - (want[0] - want[1])) <= 1).all(), f"segment {s + 1}"
            assert (np.abs(diff_gb[where] - (want[1] - want[2])) <= 1).all(), f"segment {s + 1}"
        masked += int(anything.sum())
    return masked


def test_console_login_case_thumbnail_and_retry(
    tmp_path: Path,
    node_factory: Callable[..., NodeProcess],
    browser: Any,
) -> None:
    started = time.monotonic()
    # One structure (random weights): most but not all of each slice is masked, so the judgement
    # sees both gray and coloured pixels, and every masked pixel has the one colour.
    package = tmp_path / "heart-only"
    make_random_package(package, structures=("heart",), seed=2)
    pacs_port = free_port()  # nothing listens yet: the destination is down
    console_port = free_port()
    node = node_factory(
        package,
        pacs_port,
        send={"max_attempts": 1, "initial_backoff_s": 0.3, "max_backoff_s": 1, "timeout_s": 5},
        console={"enabled": True, "host": "127.0.0.1", "port": console_port},
    )
    for name in USERS:
        add_user(node.config, name)
    node.start()
    base = f"http://127.0.0.1:{console_port}"
    page = browser.new_page()

    # A wrong password is refused.
    sign_in(page, base, "victor", "not-the-password")
    assert "Wrong user name or password" in page.locator("#login-error").inner_text()
    assert page.url == f"{base}/login"

    sign_in(page, base, "victor")
    assert page.locator("#whoami").inner_text() == "victor (viewer)"

    ct = ct_series(n_slices=3)
    files = write_files(ct, tmp_path / "ct")
    assert storescu(node.port, files).returncode == 0
    until_shown(page, f"{base}/cases", "tr.case[data-state=done]", "the case, done")
    job_id = int(page.locator("tr.case").first.get_attribute("data-job"))

    # The case and its thumbnail: the SEG over the CT, judged against the SEG in the outbox.
    page.click(f"a[href='/cases/{job_id}']")
    page.wait_for_function(
        "() => { const i = document.getElementById('thumbnail'); "
        "return i && i.complete && i.naturalWidth > 0; }",
        timeout=STEP_S * 1000,
    )
    rgb = thumbnail_pixels(page)
    seg_path = next((node.storage / "outbox" / str(job_id)).glob("seg-*.dcm"))
    masked = judge_thumbnail(rgb, seg_path, files)
    assert 0.05 < masked / (rgb.shape[0] * 192 * 3) < 0.95, masked
    audit = (node.storage / "audit.jsonl").read_text()
    assert '"view": "thumbnail"' in audit and '"user": "victor"' in audit

    # The failed send, its reason, no retry button for a viewer, a forged retry refused.
    until_shown(page, f"{base}/", "tr.failed-send", "the dead-lettered sends")
    reason = page.locator("tr.failed-send").first.inner_text()
    assert "no association" in reason, reason
    assert page.locator("#retry-pacs").count() == 0
    page.evaluate(  # a forged form, with the page's own CSRF token
        "() => { const f = document.createElement('form'); f.method = 'post'; "
        "f.action = '/retry'; for (const [k, v] of [['destination', 'pacs'], ['csrf', "
        "document.querySelector('input[name=csrf]').value]]) { const i = "
        "document.createElement('input'); i.name = k; i.value = v; f.appendChild(i); } "
        "document.body.appendChild(f); f.submit(); }"
    )
    page.wait_for_selector("#refusal", timeout=STEP_S * 1000)
    assert page.locator("#refusal").inner_text() == "Only an admin may retry sends."
    assert node.status()["sends"].get("failed") == 2

    page.click("text=Sign out")
    sign_in(page, base, "alice")
    assert page.locator("#whoami").inner_text() == "alice (admin)"
    scp = StoreSCP(tmp_path / "pacs", pacs_port).start()  # the destination comes up
    try:
        page.click("#retry-pacs")
        assert "2 failed send(s) queued again" in page.locator("#message").inner_text()
        assert set(results(scp, timeout_s=STEP_S)) == {"SEG", "SR"}
    finally:
        scp.stop()
    until_shown(
        page,
        f"{base}/cases/{job_id}",
        "tr.send[data-state=done] + tr.send[data-state=done]",
        "two sends done",
    )
    page.goto(f"{base}/")
    assert page.locator("#destination-pacs td.ok").inner_text() == "ok"
    assert page.locator("tr.failed-send").count() == 0
    page.close()
    took = time.monotonic() - started
    print(
        f"console browser test: {took:.1f} s, thumbnail {rgb.shape[1]}x{rgb.shape[0]}, "
        f"{masked} masked px"
    )
