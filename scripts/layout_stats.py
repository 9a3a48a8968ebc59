"""Figures about the package's layout: modules per folder, the largest files, import cycles and
what `import reludoctor` costs.

Run: .venv/bin/python scripts/layout_stats.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import grimp
import networkx

PACKAGE = "reludoctor"
SOURCE = Path(__file__).resolve().parent.parent / "src" / PACKAGE
HEAVY = ("tensorflow", "keras", "tensorboard", "matplotlib", "sklearn", "torch.distributed.rpc")


def modules_per_folder() -> Counter[str]:
    return Counter(str(path.parent.relative_to(SOURCE.parent)) for path in SOURCE.rglob("*.py"))


def largest_files(count: int = 3) -> list[tuple[int, str]]:
    sizes = [
        (len(path.read_text().splitlines()), str(path.relative_to(SOURCE.parent)))
        for path in SOURCE.rglob("*.py")
    ]
    return sorted(sizes, reverse=True)[:count]


def import_cycles() -> list[list[str]]:
    """Strongly connected groups of modules (imports inside functions count, TYPE_CHECKING not)."""
    graph = grimp.build_graph(PACKAGE, exclude_type_checking_imports=True)
    edges = networkx.DiGraph()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            edges.add_edge(module, imported)
    groups = [sorted(group) for group in networkx.strongly_connected_components(edges)]
    return sorted((group for group in groups if len(group) > 1), key=len, reverse=True)


def import_time(statement: str, repeats: int = 7) -> tuple[float, list[str]]:
    """Median wall seconds of an import in a fresh interpreter, and the modules it loaded."""
    code = (
        f"import time, sys; t = time.perf_counter(); {statement}; "
        "print(time.perf_counter() - t); print(' '.join(sorted(sys.modules)))"
    )
    times, loaded = [], []
    for _ in range(repeats):
        lines = subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        ).stdout.splitlines()
        times.append(float(lines[0]))
        loaded = lines[1].split()
    return statistics.median(times), loaded


def main() -> None:
    for folder, count in sorted(modules_per_folder().items()):
        print(f"{folder:28} {count:3} modules")
    for lines, name in largest_files():
        print(f"largest: {name} ({lines} lines)")
    cycles = import_cycles()
    print(f"import cycles: {len(cycles)}")
    for group in cycles:
        print("  " + " <-> ".join(name.removeprefix(PACKAGE + ".") for name in group))
    torch_seconds, _ = import_time("import torch")
    seconds, loaded = import_time("import reludoctor")
    print(
        f"import reludoctor: {seconds:.2f} s, import torch alone {torch_seconds:.2f} s"
        " (medians of 7)"
    )
    heavy = sorted(name for name in loaded if name in HEAVY)
    ours = sorted(name for name in loaded if name.split(".")[0] == PACKAGE)
    print(f"  loads {', '.join(heavy) or 'none'} of {', '.join(HEAVY)}")
    print(f"  loads {len(ours)} reludoctor modules: {' '.join(ours)}")


if __name__ == "__main__":
    main()
