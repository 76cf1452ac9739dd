"""Shared fixtures: a tiny synthetic dataset made once per session, free ports, subprocess helpers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # One JIT build cache for every test and subprocess, so a DeepSpeed op compiled once (about
    # 2 minutes on 2 cores) is never compiled again; the default backends here need none.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cmd(args: list[str], cwd: Path = REPO, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a real command; on failure the assertion shows its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc


def tiny_overrides(run_dir: Path, data_root: Path) -> list[str]:
    """A model and dataset small enough that a few steps take seconds on 2 cores."""
    return [
        f"run.dir={run_dir}",
        f"data.root={data_root}",
        "data.generate=true",
        "data.synth.images=6",
        "data.synth.height=96",
        "data.synth.width=96",
        "data.shard.tile=32",
        "data.shard.shard_bytes=20000",
        "data.shard.val_fraction=0.34",
        "data.batch_size=4",
        "data.workers=2",
        "data.shuffle_buffer=16",
        "model.base_width=4",
        "model.depth=2",
        "train.warmup_steps=2",
        "train.lr=0.01",
    ]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Two cores shared with other jobs: one torch thread is faster than two contending ones, and deterministic."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic shards made once for the session by the project's own generator."""
    from unetdist.config import load_config
    from unetdist.data.default import ensure_dataset

    root = tmp_path_factory.mktemp("tiny") / "data"
    cfg = load_config(None, tiny_overrides(root.parent / "unused", root))
    ensure_dataset(cfg.data, cfg.model.num_classes)
    return root


PYTHON = sys.executable
