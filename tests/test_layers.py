import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_layers.py"
spec = importlib.util.spec_from_file_location("import_layers", SCRIPT)
import_layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_layers)


def test_packages_import_only_those_before_them():
    graph = import_layers.package_imports()
    assert import_layers.violations(graph) == []
    assert "spinquant" in graph["export"] and "runner" in graph["export"]  # the graph is really read


def test_an_import_against_the_order_is_named_with_its_file_and_line(tmp_path):
    for package in import_layers.ORDER:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "spinquant" / "late.py").write_text("import os\n\ndef f():\n    from export.to_pte import run\n")
    bad = import_layers.violations(import_layers.package_imports(tmp_path))
    assert bad == [f"{Path('spinquant/late.py')}:4: spinquant imports export, which comes after it (spinquant → kernels → runner → export)"]
