"""Device choice, memory queries, pinned memory and the copy stream."""

from __future__ import annotations

import pynvml
import pytest
import torch

from edge_prism.errors import ConfigError
from edge_prism.runtime.device import (
    CopyStream,
    default_dtype,
    free_memory_bytes,
    gpu_info,
    host_available_bytes,
    is_pinned,
    measure_h2d_bandwidth,
    pin,
    pinned_empty,
    resolve_device,
    synchronize,
)

cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def no_cuda(monkeypatch):
    """Pretend this machine has no CUDA, so the CPU-only behaviour is tested everywhere."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ---- CPU (everywhere) ---------------------------------------------------------------


def test_resolve_cpu_and_auto_without_cuda(no_cuda):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "CUDA:1"])
def test_resolve_cuda_without_cuda_says_to_use_cpu(no_cuda, name):
    with pytest.raises(ConfigError) as info:
        resolve_device(name)
    message = str(info.value)
    assert f"'{name}'" in message
    assert "--device cpu" in message


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x", "cuda:-1", ""])
def test_resolve_rejects_unknown_devices(name):
    with pytest.raises(ConfigError, match="auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_default_dtype_on_cpu_is_float32():
    assert default_dtype(torch.device("cpu")) == torch.float32


def test_memory_queries_on_cpu():
    assert host_available_bytes() > 0
    assert free_memory_bytes(torch.device("cpu")) > 0


def test_gpu_info_without_driver_is_empty(monkeypatch):
    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    assert gpu_info() == []


def test_gpu_info_never_raises_and_reports_plain_fields():
    gpus = gpu_info()
    assert isinstance(gpus, list)
    for gpu in gpus:
        assert set(gpu) == {"index", "name", "total", "free", "driver"}
        assert gpu["total"] >= gpu["free"] >= 0


def test_pin_is_identity_without_cuda(no_cuda):
    t = torch.arange(8)
    assert pin(t) is t
    assert not is_pinned(t)


def test_cpu_copy_stream_is_synchronous_stand_in():
    stream = CopyStream(torch.device("cpu"))
    src = torch.arange(16, dtype=torch.float32)
    dst = torch.zeros(16)
    mark = stream.record_compute_done()
    handle = stream.copy(dst, src, after=[mark])
    assert handle.done()
    handle.wait()
    stream.make_compute_wait(handle)
    assert mark.done()
    assert torch.equal(dst, src)
    synchronize(torch.device("cpu"))


def test_cpu_bandwidth_probe_is_positive():
    assert measure_h2d_bandwidth(torch.device("cpu"), nbytes=2**20, repeats=2) > 0


def test_bandwidth_probe_rejects_nonsense():
    with pytest.raises(ConfigError):
        measure_h2d_bandwidth(torch.device("cpu"), nbytes=0)


# ---- CUDA ---------------------------------------------------------------------------


@cuda
@needs_cuda
def test_resolve_cuda_gives_an_explicit_index():
    device = resolve_device("cuda")
    assert device.type == "cuda" and device.index is not None
    assert resolve_device("auto") == device
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@cuda
@needs_cuda
def test_cuda_dtype_and_memory_queries():
    device = resolve_device("cuda")
    assert default_dtype(device) in (torch.bfloat16, torch.float16)
    assert 0 < free_memory_bytes(device) <= torch.cuda.get_device_properties(device).total_memory


@cuda
@needs_cuda
def test_pinned_memory_is_pinned():
    t = torch.randn(1024)
    pinned = pin(t)
    assert pinned.is_pinned() and is_pinned(pinned)
    torch.testing.assert_close(pinned, t)
    assert pin(pinned) is pinned  # no second copy
    assert pinned_empty((4, 4), torch.bfloat16).is_pinned()


@cuda
@needs_cuda
def test_copy_stream_copies_land_after_compute_waits():
    device = resolve_device("cuda")
    stream = CopyStream(device)
    src = pin(torch.randn(64, 1024, 1024))  # 256 MiB: long enough to still be running
    dst = torch.empty(src.shape, device=device)
    # dst comes from the compute stream's allocator: the copy waits for compute so far.
    handle = stream.copy(dst, src, after=[stream.record_compute_done()])
    stream.make_compute_wait(handle)
    checksum = dst.sum()  # queued on the compute stream behind the copy
    torch.testing.assert_close(checksum.cpu(), src.sum(), rtol=1e-4, atol=1e-1)
    assert handle.done()
    torch.testing.assert_close(dst.cpu(), src)


@cuda
@needs_cuda
def test_cuda_bandwidth_probe():
    assert measure_h2d_bandwidth(resolve_device("cuda"), nbytes=16 * 2**20, repeats=3) > 1e8
