"""Which of the project's packages imports which, and whether that respects their order.

    python scripts/import_layers.py

The order (README, "What is where"): spinquant → kernels → runner → export; a package imports only
those before it, so there is no import cycle between them. Every import statement counts, those
inside functions too. Prints each package's imports; exits 1, naming the file and line, on any import
against the order.
"""

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ORDER = ("spinquant", "kernels", "runner", "export")
ROOT = Path(__file__).resolve().parents[1]


def imported_modules(tree: ast.AST) -> Iterator[tuple[str, int]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno


def package_imports(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """{package: {imported package: ["file:line", ...]}} over the project's packages."""
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in ORDER}
    for package in ORDER:
        for path in sorted((root / package).rglob("*.py")):
            for module, line in imported_modules(ast.parse(path.read_text(), str(path))):
                target = module.split(".")[0]
                if target in ORDER and target != package:
                    graph[package].setdefault(target, []).append(f"{path.relative_to(root)}:{line}")
    return graph


def violations(graph: dict[str, dict[str, list[str]]]) -> list[str]:
    """Every import of a package that comes later in ORDER (the only way a cycle can form)."""
    return [
        f"{where}: {package} imports {target}, which comes after it ({' → '.join(ORDER)})"
        for package, targets in graph.items()
        for target, places in targets.items()
        if ORDER.index(target) > ORDER.index(package)
        for where in places
    ]


def main() -> int:
    graph = package_imports()
    for package in ORDER:
        print(f"{package}: imports {', '.join(sorted(graph[package])) or 'none of the others'}")
    bad = violations(graph)
    print("\n".join(bad) if bad else f"no import cycle: {' → '.join(ORDER)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
