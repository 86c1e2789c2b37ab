"""How busy the GPU was while a benchmark ran, sampled from NVML in a background thread.

Images per second alone cannot tell a slow model from an idle GPU; the fraction of time a kernel
was running can. NVML's ``utilization.gpu`` is "percent of time over the past sample period during
which one or more kernels was executing on the GPU", the period being between 1/6 s and 1 s
depending on the product (NVML API reference, nvmlUtilization_t), so windows shorter than about a
second are coarse. ``memory.used`` is the device's, all processes together (nvmlMemory_t).

``pynvml`` comes from the ``nvidia-ml-py`` package. Without it, without a driver or without a GPU
the monitor is simply ``available = False`` and its figures are None: the CPU smoke bench runs it too.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)


def default_device_index() -> int:
    """NVML index of the GPU this process uses: CUDA_VISIBLE_DEVICES' first entry when it is an integer, else 0.

    Both number GPUs in PCI bus order only when CUDA_DEVICE_ORDER=PCI_BUS_ID (CUDA's default order is
    fastest first); on single-GPU nodes and Kubernetes pods, which see one GPU, the two agree anyway.
    A UUID entry (GPU-...) gives 0.
    """
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


class GpuMonitor:
    """Context manager sampling one GPU's utilization and memory every ``interval_s`` seconds.

    ``samples`` holds (time.monotonic(), utilization.gpu in %, memory.used in bytes); ``busy`` and
    ``peak_memory_mb`` summarise them over a window given in the same monotonic clock, so a caller
    can time a phase with ``time.monotonic()`` and ask how busy the GPU was during it.
    """

    def __init__(self, interval_s: float = 0.1, device_index: int | None = None):
        self.interval_s = interval_s
        self.device_index = default_device_index() if device_index is None else device_index
        self.available = False
        self.reason = "not started"  # why available is False, for the bench report
        self.samples: list[tuple[float, float, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        self._handle = None

    # ---- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> GpuMonitor:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Open NVML and start sampling; on any failure stay unavailable instead of raising."""
        try:
            import pynvml
        except ImportError:
            self.reason = "nvidia-ml-py is not installed"
            return
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, _DriverNotLoaded, ...: no GPU here
            self.reason = f"NVML did not start ({exc})"
            return
        self._nvml = pynvml
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
            self._sample()  # one sample at once, so even a very short run has a figure
        except Exception as exc:  # noqa: BLE001 - no such index, or the GPU cannot report utilization
            self.reason = f"NVML has no usable GPU {self.device_index} ({exc})"
            self._shutdown()
            return
        self.available, self.reason = True, ""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and close NVML; the samples stay for ``busy`` and ``peak_memory_mb``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._shutdown()

    def _shutdown(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
            self._nvml = self._handle = None

    # ---- sampling ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception as exc:  # noqa: BLE001 - the GPU fell off the bus or NVML closed: keep what we have
                log.warning("GPU monitor stopped sampling GPU %d: %s", self.device_index, exc)
                return

    def _sample(self) -> None:
        t = time.monotonic()
        util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
        mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
        self._record(t, util, mem)

    def _record(self, t: float, util: float, mem: int) -> None:
        """Add one sample; the thread's only way in, and the tests' way to feed synthetic samples."""
        with self._lock:
            self.samples.append((float(t), float(util), int(mem)))

    def _window(self, start: float | None, end: float | None) -> list[tuple[float, float, int]]:
        with self._lock:
            return [s for s in self.samples if (start is None or s[0] >= start) and (end is None or s[0] <= end)]

    # ---- figures ------------------------------------------------------------------------------
    def busy(self, start: float | None = None, end: float | None = None) -> float | None:
        """Mean utilization.gpu / 100 over the samples taken in [start, end] (monotonic seconds).

        None when there is no sample in the window: no GPU, or a window shorter than ``interval_s``.
        """
        window = self._window(start, end)
        if not window:
            return None
        return sum(s[1] for s in window) / len(window) / 100.0

    def peak_memory_mb(self, start: float | None = None, end: float | None = None) -> float | None:
        """Largest device memory.used in MiB over the samples in [start, end]; None without samples."""
        window = self._window(start, end)
        if not window:
            return None
        return max(s[2] for s in window) / 2**20
