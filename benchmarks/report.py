"""What every benchmark script records next to its numbers, and the doc blocks it rewrites."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import torch

from nfnets.files import atomic_write


def machine_info(device: torch.device) -> dict:
    """Platform, Python, CPU (and GPU) and the torch thread count of this run."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu_name(), "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        if match:
            return match.group(1).strip()
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages, rounded (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def update_doc(path: Path, name: str, text: str) -> None:
    """Replace the text between ``<!-- bench:name:begin/end -->`` in ``path`` (or append)."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    block = f"{begin}\n{text}\n{end}"
    doc = path.read_text() if path.exists() else "# Performance\n"
    if begin in doc and end in doc:
        doc = doc[:doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip("\n") + f"\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)


def save_result(path: Path, result: dict) -> None:
    """Print a benchmark's JSON result and write it to ``path`` atomically (a stopped run
    leaves the previous file whole)."""
    text = json.dumps(result, indent=2)
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))
