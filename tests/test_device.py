"""Device handling that a CPU-only suite can still check: the CUDA peak in the prune report (faked
CUDA runtime), and that a CPU run on a GPU machine never creates a CUDA context."""

import pytest
import torch

import hfprune
from hfprune import report as report_mod

from conftest import tiny_model


class FakeCuda:
    """Stands in for ``torch.cuda`` counters: two devices whose peaks the test sets."""

    def __init__(self, initialized: bool, peaks=(100 * 2**20, 300 * 2**20)):
        self.initialized = initialized
        self.peaks = list(peaks)
        self.resets: list[int] = []
        self.asked: list[int] = []

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: self.initialized)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(self.peaks))
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self.reset)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", self.peak)

    def reset(self, device=None):
        if not self.initialized:
            raise AssertionError("reset_peak_memory_stats would create a CUDA context")
        self.resets.append(0 if device is None else int(device))

    def peak(self, device=None):
        if not self.initialized:
            raise AssertionError("max_memory_allocated would create a CUDA context")
        index = 0 if device is None else int(device)
        self.asked.append(index)
        return self.peaks[index]


def _prune(config):
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    return hfprune.prune(tiny_model("llama"), config=config, calibration=ids, progress=False)


@pytest.mark.parametrize("config", [hfprune.WandaConfig(sparsity=0.5),
                                    hfprune.StructuredConfig(mlp_ratio=0.25, importance="magnitude",
                                                             compensation="none"),
                                    hfprune.DepthPruningConfig(num_blocks=1, keep_first=0, keep_last=0)],
                         ids=["wanda", "structured", "depth"])
def test_report_has_the_fullest_gpus_peak_since_the_prune_started(monkeypatch, config):
    cuda = FakeCuda(initialized=True)
    cuda.install(monkeypatch)
    rep = _prune(config)
    assert sorted(set(cuda.resets)) == [0, 1]  # every device's peak restarted for this run
    assert set(cuda.asked) == {0, 1}
    assert rep.peak_cuda_mb == pytest.approx(300.0)  # device 1, the fuller one
    assert "peak_cuda_mb" in rep.to_dict()


def test_cpu_run_on_a_gpu_machine_leaves_cuda_alone(monkeypatch):
    """CUDA is available but this process never used it: no counter is read (each would start a
    CUDA context, hundreds of MB), and the report says there is no CUDA peak."""
    cuda = FakeCuda(initialized=False)
    cuda.install(monkeypatch)
    rep = _prune(hfprune.WandaConfig(sparsity=0.5))
    assert rep.peak_cuda_mb is None and cuda.resets == [] and cuda.asked == []
    assert report_mod.peak_cuda_mb() is None


def test_no_cuda_no_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert report_mod.peak_cuda_mb() is None
    report_mod.reset_peak_cuda()  # nothing to reset, no error


def test_activations_leave_a_full_gpu_for_cpu_memory(monkeypatch):
    from hfprune.core import runner as runner_mod

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 80 * 2**30))
    gpu = torch.device("cuda", 0)
    assert runner_mod.activation_storage(gpu, 2 * 2**30) == gpu  # 2 GiB of 8 GiB free: stays
    assert runner_mod.activation_storage(gpu, 3 * 2**30) == torch.device("cpu")  # > 25 %: CPU memory
    assert runner_mod.activation_storage(torch.device("cpu"), 10**15) == torch.device("cpu")


def test_capture_decides_the_storage_once_from_the_whole_calibration_set(monkeypatch):
    """The runner asks with all batches' bytes (not one batch's) and keeps the answer."""
    from hfprune.core import runner as runner_mod

    asked = []

    def fake_storage(device, total):
        asked.append(total)
        return torch.device("cpu")

    monkeypatch.setattr(runner_mod, "activation_storage", fake_storage)
    model = tiny_model("llama")
    run = runner_mod.LayerRunner(model, batch_size=2)
    run.capture(torch.randint(3, 300, (5, 16)))
    hidden = model.config.hidden_size
    assert asked == [2 * 16 * hidden * 4 * 3]  # first batch [2, 16, hidden] fp32 x 3 batches
    assert run.storage_device == torch.device("cpu") and len(run.hidden) == 3
