"""Shared by the benchmark scripts: the machine a result came from, and how results are written.

Every result names its machine (CPU, cores, load, versions, date) because numbers from a shared
machine only compare within one run, and across runs only with the machine in view.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def machine_info(device: str) -> dict[str, Any]:
    """What a reader needs to compare this result with another machine's."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("torch", "transformers", "transformer-lens", "datasets"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # others' work on a shared machine
        "device": device,
        **versions,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_line(m: dict[str, Any]) -> str:
    """The line under a results table that names its machine (``machine_info``'s dict)."""
    return (
        f"{m['date']}; {m['cpu']}, {m['cores']} cores, load average {m['load_average_1min']}; "
        f"torch {m['torch']}, transformers {m['transformers']}, "
        f"transformer-lens {m['transformer-lens']}."
    )


def write_results(stem: str, result: dict[str, Any], markdown: str, out: Path = RESULTS) -> None:
    """Print the JSON and the table, and write both to ``out/stem.{json,md}``."""
    print(json.dumps(result, indent=2))
    print(markdown)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
