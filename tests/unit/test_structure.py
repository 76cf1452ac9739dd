"""The package's structure, checked: every test file runs in CI, and layers import only downward.

Why: a test folder named like a build output (`dist`) was silently skipped by pytest for a whole
round, and upward imports (training importing benchmarks, the model importing the parallel
layer) made the layers impossible to read or reuse separately.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "unetdist"

# Lowest first. A module may import its own layer and any layer before it, never one after it.
LAYERS: tuple[str, ...] = ("config", "model", "data", "parallel", "train", "infer", "bench", "cli")
# The package's `__init__` is the public API and sits above every layer.
TOP = "unetdist"
# The only layer that talks to torch.distributed; everything else goes through its small API.
DISTRIBUTED_LAYER = "parallel"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports (at any depth: lazy and TYPE_CHECKING imports count), with its line."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found.extend((node.lineno, f"{target}.{alias.name}") for alias in node.names)
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "unetdist":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else TOP


def upward_imports(root: Path = PACKAGE) -> list[str]:
    """`file:line: layer -> higher layer` for every import that points up."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        own = _layer(_module_name(path))
        if own == TOP:
            continue
        assert own is not None
        for line, target in _imports(path):
            layer = _layer(target)
            if layer is None or layer == TOP and target != "unetdist":
                continue
            if layer == TOP or LAYERS.index(layer) > LAYERS.index(own):
                problems.append(f"{path.relative_to(REPO)}:{line}: {own} imports {target} ({layer})")
    return problems


def distributed_imports(root: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        if _layer(_module_name(path)) == DISTRIBUTED_LAYER:
            continue
        for line, target in _imports(path):
            if target == "torch.distributed" or target.startswith("torch.distributed.") and "checkpoint" not in target:
                problems.append(f"{path.relative_to(REPO)}:{line}: imports {target}")
    return problems


def test_every_package_folder_is_a_layer() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py" and p.name != "__main__.py"}
    assert folders | modules <= set(LAYERS), f"not placed in LAYERS: {sorted((folders | modules) - set(LAYERS))}"


def test_layers_import_only_downward() -> None:
    assert upward_imports() == []


def test_only_the_parallel_layer_calls_torch_distributed() -> None:
    assert distributed_imports() == []


def test_the_contract_test_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker itself must fail on a violation, or the two tests above prove nothing."""
    fake = tmp_path / "unetdist"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "__init__.py").write_text("")
    (fake / "model" / "bad.py").write_text("def f():\n    from unetdist.bench.peak import peak_flops\n")
    (fake / "model" / "rel.py").write_text("from ..train import loop\n")
    (fake / "data").mkdir()
    (fake / "data" / "__init__.py").write_text("")
    (fake / "data" / "ok.py").write_text("from unetdist.model import UNet\nimport torch.distributed as dist\n")
    global REPO
    saved = REPO
    REPO = tmp_path
    try:
        up = upward_imports(fake)
        dist = distributed_imports(fake)
    finally:
        REPO = saved
    assert any("model/bad.py:2" in p and "unetdist.bench" in p for p in up), up
    assert any("model/rel.py:1" in p and "unetdist.train" in p for p in up), up
    assert not any("data/ok.py" in p for p in up), up
    assert any("data/ok.py:2" in p for p in dist), dist


def test_every_test_file_is_collected() -> None:
    """The README's test command must collect every tests/**/test_*.py on disk (none skipped by folder name)."""
    on_disk = {str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = {line.split("::", 1)[0] for line in proc.stdout.splitlines() if "::" in line}
    # A module skipped as a whole at import (e.g. no GPU) is still collected: pytest reports it as skipped.
    skipped = {line.split()[2].split(":")[0] for line in proc.stdout.splitlines() if line.startswith("SKIPPED")}
    missing = sorted(on_disk - collected - skipped)
    assert not missing, f"test files pytest does not collect (check norecursedirs and folder names): {missing}"
