"""What produced a result: pefttune's version and commit, the packages, the machine, the config.

:func:`collect` gathers a :class:`Provenance` for this process and a study's config. It goes
into the report (:func:`markdown`), ``summary.json`` (``provenance``), the schema metadata of
the analysis's parquet tables (key ``pefttune.provenance``, JSON:
:meth:`Provenance.parquet_metadata`) and the model card of an exported model. It describes the
process that wrote them: for ``pefttune run``, the driver of the study (trials on other nodes of
a cluster may differ in hardware; ``node_id`` in the trials table says where each ran).

The config hash is the SHA-256 of the resolved config as JSON with sorted keys (the content of
the study's ``experiment.yaml``), ``tracking`` left out (where results are sent does not change
them), first 16 hex digits: two studies with the same hash ran the same experiment.

Example::

    from pefttune.config import load_config
    from pefttune.runtime.provenance import collect, markdown

    prov = collect(load_config())
    print(prov.torch, prov.git_commit, prov.config_hash)   # 2.13.0+cpu 5f1c... 9b0d4c2e1a7f3b65
    print("\\n".join(markdown(prov)))                     # the report's "Provenance" section

    import pyarrow.parquet as pq
    json.loads(pq.read_schema("trials.parquet").metadata[b"pefttune.provenance"])["config_hash"]
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, fields, replace
from importlib import metadata
from pathlib import Path
from typing import Any

#: The schema-metadata key of the parquet tables.
PARQUET_KEY = b"pefttune.provenance"
NOT_A_CHECKOUT = "not a git checkout"
#: Config sections left out of the hash: they do not change the results.
UNHASHED = ("tracking",)
PACKAGES = ("torch", "transformers", "peft", "ray", "optuna", "numpy")


@dataclass(frozen=True)
class Provenance:
    """What produced a result (see the module docstring)."""

    pefttune: str
    git_commit: str  # the commit of pefttune's source, or NOT_A_CHECKOUT
    git_modified: bool | None  # uncommitted changes in pefttune's source (None: not a checkout)
    python: str
    torch: str
    transformers: str
    peft: str
    ray: str
    optuna: str
    numpy: str
    cpu: str
    cpu_threads: int
    gpu: str  # model(s), or "none"
    gpu_count: int
    config_hash: str | None  # None: no config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Provenance":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def parquet_metadata(self) -> dict[bytes, bytes]:
        return {PARQUET_KEY: json.dumps(self.to_dict(), sort_keys=True).encode()}

    @property
    def commit(self) -> str:
        """The commit as a reader sees it: ``<sha>``, ``<sha> (modified)``, or not a git checkout."""
        return f"{self.git_commit} (modified)" if self.git_modified else self.git_commit


def collect(config: Any = None) -> Provenance:
    """The provenance of this process; ``config``: a StudyConfig, or its saved dict (``experiment.yaml``)."""
    return replace(_environment(), config_hash=config_hash(config) if config is not None else None)


def config_hash(config: Any) -> str:
    """SHA-256 (16 hex digits) of the resolved config (StudyConfig or its JSON dump), ``tracking`` left out."""
    data = config if isinstance(config, dict) else config.model_dump(mode="json")
    data = {k: v for k, v in data.items() if k not in UNHASHED}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def markdown(prov: Provenance | dict) -> list[str]:
    """The report's short "Provenance" section (Markdown lines)."""
    prov = prov if isinstance(prov, Provenance) else Provenance.from_dict(prov)
    packages = ", ".join(f"{name} {getattr(prov, name)}" for name in PACKAGES)
    gpu = "none" if not prov.gpu_count else f"{prov.gpu_count} x {prov.gpu}"
    config = f"`{prov.config_hash}` (SHA-256 of the resolved config)" if prov.config_hash else "no config"
    return [
        "## Provenance",
        "",
        "| | |",
        "|---|---|",
        f"| pefttune | {prov.pefttune}, commit `{prov.commit}` |",
        f"| config hash | {config} |",
        f"| Python | {prov.python} |",
        f"| packages | {packages} |",
        f"| CPU | {prov.cpu}, {prov.cpu_threads} threads |",
        f"| GPU | {gpu} |",
        "",
    ]


# -- the environment (once per process) ------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _environment() -> Provenance:
    from pefttune import __version__

    commit, modified = _git_state(Path(__file__).resolve().parents[1])
    gpu, gpus = _gpus()
    return Provenance(
        pefttune=__version__, git_commit=commit, git_modified=modified, python=platform.python_version(),
        **{name: _version(name) for name in PACKAGES},
        cpu=_cpu_model(), cpu_threads=_cpu_threads(), gpu=gpu, gpu_count=gpus, config_hash=None,
    )


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(package_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=package_dir, capture_output=True, text=True, timeout=10)


def _git_state(package_dir: Path) -> tuple[str, bool | None]:
    """(commit, modified) of the git checkout holding pefttune's own source; a package installed
    into some other repository's tree (a venv inside a checkout) is not a checkout of pefttune."""
    try:
        tracked = _git(package_dir, "ls-files", "--error-unmatch", "__init__.py")
        if tracked.returncode != 0:
            return NOT_A_CHECKOUT, None
        commit = _git(package_dir, "rev-parse", "HEAD").stdout.strip()
        if not commit:
            return NOT_A_CHECKOUT, None
        status = _git(package_dir, "status", "--porcelain", "--untracked-files=no", "--", ".")
        return commit, bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return NOT_A_CHECKOUT, None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_threads() -> int:
    """Logical CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 0


def _gpus() -> tuple[str, int]:
    import torch

    if not torch.cuda.is_available():
        return "none", 0
    count = torch.cuda.device_count()
    names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
    return ", ".join(names), count
