"""``dicom-node evaluate`` on a folder it cannot use: one clear line, exit status 2, no traceback.

The bundled packages of ``config/models/`` are evaluated on small synthetic folders (no shared
data); every refusal comes before the network runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_node.common.errors import InputError
from dicom_node.package.manifest import load_package
from dicom_node.training.data import read_split
from dicom_node.training.evaluate import evaluate
from tests.factories import REPO

CXR = REPO / "config" / "models" / "cxr-anatomy"
LA_LGE = REPO / "config" / "models" / "la-lge"
SIZE = (48, 40)  # (width, height) of the synthetic PNGs


def png(path: Path, size: tuple[int, int] = SIZE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0])).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def png_folder(root: Path, cases: list[str], structures: list[str]) -> Path:
    for case in cases:
        png(root / "images" / f"{case}.png")
        for structure in structures:
            png(root / "masks" / structure / f"{case}.png")
    return root


@pytest.fixture
def cxr_folder(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """A PNG folder with every validation case of cxr-anatomy's split.json and all masks."""
    cases = list(read_split(CXR).validation)
    structures = [s.label for s in load_package(CXR).structures]
    return png_folder(tmp_path / "data", cases, structures), cases, structures


def run_evaluate(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", "evaluate", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def the_one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The command failed with one line on stderr and no traceback; return the line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dicom-node: ")
    return lines[0]


def test_a_missing_mask_names_the_case_and_the_file(
    cxr_folder: tuple[Path, list[str], list[str]],
) -> None:
    data, cases, structures = cxr_folder
    gone = data / "masks" / structures[2] / f"{cases[1]}.png"
    gone.unlink()
    line = the_one_line(run_evaluate("--model", str(CXR), "--data", str(data)))
    assert f"case {cases[1]}: mask {gone} not found" in line
    assert "--all-cases" not in line  # it would not help: every image needs its masks


def test_a_mask_of_another_size_names_the_case_the_file_and_both_sizes(
    cxr_folder: tuple[Path, list[str], list[str]],
) -> None:
    data, cases, structures = cxr_folder
    other = data / "masks" / structures[0] / f"{cases[0]}.png"
    png(other, (SIZE[0] * 2, SIZE[1]))
    line = the_one_line(run_evaluate("--model", str(CXR), "--data", str(data), "--all-cases"))
    assert f"case {cases[0]}: mask {other} is 96 x 40 pixels" in line
    assert f"is {SIZE[0]} x {SIZE[1]}" in line


def test_a_folder_without_the_split_cases_suggests_all_cases(tmp_path: Path) -> None:
    structures = [s.label for s in load_package(CXR).structures]
    data = png_folder(tmp_path / "data", ["other_001", "other_002"], structures)
    with pytest.raises(InputError) as caught:
        evaluate(CXR, data)
    message = str(caught.value)
    first = read_split(CXR).validation[0]
    assert f"case {first}: image {data / 'images' / first}.png not found" in message
    assert "add --all-cases" in message and "\n" not in message


def test_a_3d_folder_without_the_split_cases_suggests_all_cases(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(InputError, match="add --all-cases") as caught:
        evaluate(LA_LGE, tmp_path / "data")
    first = read_split(LA_LGE).validation[0]
    assert f"case {first}: " in str(caught.value)
