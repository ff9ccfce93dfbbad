"""GPU slots and the CUDA out-of-memory fallback, on the CPU: the error is injected by a fake
network (no GPU needed), the slot limit by a DeviceSlots on a CUDA device object."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import structlog
import torch

from dicom_node.imaging.series import load_series
from dicom_node.models.inference import DeviceSlots, InferenceReport, Segmenter
from dicom_node.testing.random_package import make_random_package
from dicom_node.work.segment import segment_series
from tests.conftest import wait_for
from tests.factories import ct_series, write_files

CPU = torch.device("cpu")


class RunsOutOfMemory(torch.nn.Module):
    """Raises CUDA out-of-memory for batches above ``fits`` (or always: ``fits=0``), and
    records the batch size of every call; otherwise runs ``network``."""

    def __init__(self, network: torch.nn.Module, fits: int) -> None:
        super().__init__()
        self.network = network
        self.fits = fits
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(x.shape[0]))
        if x.shape[0] > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.network(x)  # type: ignore[no-any-return]


def test_2d_halves_the_batch_then_runs_on_the_cpu(tmp_path: Path) -> None:
    package = make_random_package(tmp_path / "m", structures=("heart",))
    series = load_series(write_files(ct_series(n_slices=8, rows=32, cols=32), tmp_path / "ct"))
    plain = Segmenter(package, CPU, batch_size=8).predict(series)
    segmenter = Segmenter(package, CPU, batch_size=8)
    failing = RunsOutOfMemory(segmenter.network, fits=0)  # the "GPU" never has room
    segmenter.network = failing
    cpu = RunsOutOfMemory(segmenter.network.network, fits=99)
    segmenter._cpu_network = cpu  # what _network_on_cpu hands out
    segmenter._network_on_cpu = lambda: cpu  # type: ignore[method-assign]
    report = InferenceReport()
    with structlog.testing.capture_logs() as logs:
        probs = segmenter.predict(series, report=report)
    assert failing.batches == [8, 4, 2, 1]  # each first pass of a halved batch fails
    assert cpu.batches == [8]  # then once on the CPU, with the configured batch
    np.testing.assert_allclose(probs, plain, atol=1e-6)
    assert report.degraded and report.device == "cpu" and report.batch_size == 8
    assert report.oom == [
        "CUDA out of memory at batch 8; retried with batch 4",
        "CUDA out of memory at batch 4; retried with batch 2",
        "CUDA out of memory at batch 2; retried with batch 1",
        "CUDA out of memory at batch 1; retried once on the CPU",
    ]
    assert [e["action"] for e in logs if e["event"] == "inference.oom"] == report.oom


def test_3d_halves_the_sliding_window_batch(tmp_path: Path) -> None:
    package = make_random_package(
        tmp_path / "m",
        dims=3,
        structures=("heart",),
        input_size=(16, 16, 16),
        spacing_mm=(2.5, 1.6, 1.6),
        modalities=("CT",),
    )
    series = load_series(write_files(ct_series(n_slices=8, rows=48, cols=48), tmp_path / "ct"))
    segmenter = Segmenter(package, CPU, batch_size=4)
    plain = segmenter.predict(series)
    failing = RunsOutOfMemory(segmenter.network, fits=1)
    segmenter.network = failing
    report = InferenceReport()
    probs = segmenter.predict(series, report=report)
    assert failing.batches[:3] == [4, 2, 1]  # sw_batch_size 4 and 2 fail, 1 fits
    assert set(failing.batches[3:]) == {1}
    np.testing.assert_allclose(probs, plain, atol=1e-5)
    assert report.batch_size == 1 and report.device == "cpu"  # the test's "GPU" is the CPU
    assert len(report.oom) == 2


def test_out_of_memory_on_the_cpu_fallback_is_raised(tmp_path: Path) -> None:
    package = make_random_package(tmp_path / "m", structures=("heart",))
    series = load_series(write_files(ct_series(n_slices=2, rows=32, cols=32), tmp_path / "ct"))
    segmenter = Segmenter(package, CPU, batch_size=2)
    segmenter.network = RunsOutOfMemory(segmenter.network, fits=0)
    segmenter._network_on_cpu = lambda: segmenter.network  # type: ignore[method-assign]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        segmenter.predict(series)


def test_the_job_result_says_it_was_degraded(tmp_path: Path) -> None:
    package = make_random_package(tmp_path / "m", structures=("heart",))
    paths = write_files(ct_series(n_slices=4, rows=32, cols=32), tmp_path / "ct")
    segmenter = Segmenter(package, CPU, batch_size=4)
    (ok,) = segment_series(paths, segmenter, ("seg",))
    assert not ok.inference.degraded and ok.inference.batch_size == 4
    segmenter.network = RunsOutOfMemory(segmenter.network, fits=2)
    (result,) = segment_series(paths, segmenter, ("seg",))
    assert result.inference.oom == ["CUDA out of memory at batch 4; retried with batch 2"]
    assert result.seg.SOPInstanceUID == ok.seg.SOPInstanceUID


def test_gpu_slots_limit_concurrent_runs_on_cuda_only() -> None:
    slots = DeviceSlots(2)
    inside = []
    lock = threading.Lock()
    release = threading.Event()

    def run(device: torch.device) -> None:
        with slots.hold(device):
            with lock:
                inside.append(device.type)
            release.wait(10)

    cuda = [threading.Thread(target=run, args=(torch.device("cuda"),)) for _ in range(3)]
    for t in cuda:
        t.start()
    wait_for(lambda: len(inside) == 2, 5, "two runs in their slots")
    cpu = [threading.Thread(target=run, args=(CPU,)) for _ in range(4)]
    for t in cpu:
        t.start()
    wait_for(lambda: inside.count("cpu") == 4, 5, "every CPU run, without a slot")
    assert inside.count("cuda") == 2  # the third CUDA run waits for a slot
    release.set()
    for t in cuda + cpu:
        t.join(10)
    assert inside.count("cuda") == 3
    with pytest.raises(ValueError, match="gpu_slots must be at least 1"):
        DeviceSlots(0)
