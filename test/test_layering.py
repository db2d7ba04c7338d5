"""Import layering of the recap_ros package, read with ``ast`` from the sources (nothing is imported).

The dataset format (recap_ros.dataset) is the lowest layer: export writes it and training reads it, so it imports
nothing else from recap_ros, and neither training layer (recap, policy) imports export or the ROS nodes."""
import ast
from pathlib import Path

import recap_ros

ROOT = Path(recap_ros.__file__).parent
TOP = sorted(p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file())
# subpackage -> recap_ros subpackages / modules it must not import
FORBIDDEN = {
    "dataset": set(TOP) - {"dataset"},
    "recap": {"export", "nodes", "runner", "launch_graph", "report"},
    "policy": {"export", "recap", "nodes", "runner", "launch_graph", "report"},
    "export": {"nodes", "runner", "launch_graph", "report"},
    "recording": {"export", "recap", "policy", "nodes", "runner", "launch_graph", "report"},
    "report": {"nodes", "runner", "launch_graph"},  # reads what was recorded; never part of a station
    "monitor": {"export", "recording", "nodes", "runner", "launch_graph", "report"},  # live V: model + alerts
}


def imported_parts(source: str, module: str) -> set[str]:
    """The recap_ros top-level parts that ``source`` (the text of module ``module``, e.g. 'recap_ros.recap.data')
    imports, at any depth of the file (function-level imports count), relative imports resolved."""
    out = set()
    package = module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{a.name}" for a in node.names] if target == "recap_ros" else [target]
        else:
            continue
        out |= {n.split(".")[1] for n in names if n.startswith("recap_ros.")}
    return out


def test_imported_parts_reads_every_import_form():
    src = ("import recap_ros.export.cli\nfrom recap_ros.dataset import reader\nfrom recap_ros import station, paths\n"
           "from ..export import exporter\nfrom .data import Frames\nimport numpy\n"
           "def f():\n    from recap_ros.nodes.sim_robot import main\n")
    assert imported_parts(src, "recap_ros.recap.value") == {"export", "dataset", "station", "paths", "recap", "nodes"}


def test_layers_import_only_downward():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        part = rel.parts[0]
        module = ".".join(("recap_ros",) + rel.parts)
        if path.name == "__init__.py":
            module += ".__init__"  # relative imports in a package's __init__ resolve against the package
        hits = imported_parts(path.read_text(), module) & FORBIDDEN.get(part, set())
        bad += [f"{path.relative_to(ROOT.parent)} imports recap_ros.{h}" for h in sorted(hits)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_dataset_layer_is_a_package_of_its_own():
    assert "dataset" in TOP and {"export", "recap"} <= set(TOP)
