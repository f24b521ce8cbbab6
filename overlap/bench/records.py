"""Results records in the one long JSON format every study writes (DESIGN.md §5).

    {"meta": {"study", "device", "num_gpus", "world_size", "torch", "triton", "nccl",
              "commit", "dirty", "date", "command", ...},
     "rows": [{"op", "backend", "num_sms", "time_us", "wire_gbps", "logical_gbps", ...}, ...]}
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
from typing import Any, Iterable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_state(repo: str = REPO_ROOT) -> tuple[str, bool]:
    """(commit sha, dirty flag) of the checkout, or ("unknown", True) outside git.

    The device machine receives a copy of the working tree; when it carries no .git, the
    caller can pass the commit through OVERLAP_GIT_COMMIT / OVERLAP_GIT_DIRTY.
    """
    if "OVERLAP_GIT_COMMIT" in os.environ:
        return os.environ["OVERLAP_GIT_COMMIT"], os.environ.get("OVERLAP_GIT_DIRTY", "1") == "1"
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return sha, dirty
    except Exception:
        return "unknown", True


def environment_meta() -> dict[str, Any]:
    """Device and library versions of this process."""
    import torch

    meta: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    # Tuning knobs change what a kernel does (send fractions, chunk sizes, timeouts): record them.
    meta["overlap_env"] = " ".join(sorted(f"{k}={v}" for k, v in os.environ.items()
                                          if k.startswith("OVERLAP_") and not k.startswith("OVERLAP_GIT_")))
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = None
    if torch.cuda.is_available():
        meta["device"] = torch.cuda.get_device_name(0)
        meta["num_gpus"] = torch.cuda.device_count()
        meta["num_sms_device"] = torch.cuda.get_device_properties(0).multi_processor_count
        try:
            meta["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:
            meta["nccl"] = None
        meta["cuda"] = torch.version.cuda
    else:
        meta["device"] = "cpu"
        meta["num_gpus"] = 0
        meta["nccl"] = None
    return meta


def make_meta(study: str, world_size: int, command: str | None = None, **extra: Any) -> dict[str, Any]:
    commit, dirty = git_state()
    meta = {"study": study, "world_size": world_size}
    meta.update(environment_meta())
    meta.update({"commit": commit, "dirty": dirty, "date": _dt.date.today().isoformat(),
                 "command": command if command is not None else " ".join([os.path.basename(sys.executable)] + sys.argv)})
    meta.update(extra)
    return meta


def write_results(path: str, meta: dict[str, Any], rows: Iterable[dict[str, Any]]) -> str:
    """Write one results file; rows must be flat dicts of JSON scalars."""
    rows = list(rows)
    for i, row in enumerate(rows):
        for k, v in row.items():
            if isinstance(v, (dict, list, tuple)):
                raise ValueError(f"rows[{i}][{k!r}] is not flat ({type(v).__name__}); rows must be flat")
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, sort_keys=False)
        f.write("\n")
    return path


def save_figure(fig, path: str, dpi: int = 120) -> str:
    """Lay out a matplotlib figure, write it to ``path`` (creating the folder) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def read_results(path: str) -> dict[str, Any]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "meta" not in data or "rows" not in data:
        raise ValueError(f"{path} is not a results file (needs top-level 'meta' and 'rows')")
    return data
