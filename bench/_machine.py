"""What machine a benchmark ran on: shared by the bench scripts (run as files, so this
module is imported from bench/ itself)."""

from __future__ import annotations


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo, or None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return None
