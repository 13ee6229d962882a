"""Where an engine replica's step time goes: host work versus waiting for the device.

``EngineCore`` records each ``step()``'s wall time and, with async scheduling, the part spent blocked on the in-flight
step's device results; the rest is host work (scheduling, packing, dispatch, output handling) that overlapped the
device. A host share near the whole step means the host, not the device, sets the pace. Benchmarks report it per step.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class StepTimes:
    num_steps: int = 0
    step_seconds: float = 0.0
    device_wait_seconds: float | None = 0.0  # None once a step could not tell its wait apart (synchronous steps)

    def record(self, step_seconds: float, device_wait_seconds: float | None) -> None:
        self.num_steps += 1
        self.step_seconds += step_seconds
        if device_wait_seconds is None or self.device_wait_seconds is None:
            self.device_wait_seconds = None
        else:
            self.device_wait_seconds += device_wait_seconds

    def reset(self) -> None:
        self.num_steps, self.step_seconds, self.device_wait_seconds = 0, 0.0, 0.0

    def summary(self) -> dict:
        """Per-step means in milliseconds (host and wait are None when synchronous steps were recorded)."""
        steps = max(self.num_steps, 1)
        wait = self.device_wait_seconds
        return {
            "num_steps": self.num_steps,
            "step_ms": 1e3 * self.step_seconds / steps,
            "host_ms": None if wait is None else 1e3 * (self.step_seconds - wait) / steps,
            "device_wait_ms": None if wait is None else 1e3 * wait / steps,
        }
