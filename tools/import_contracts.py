"""An import-linter contract that import-linter does not ship: no module reads another module's
private ``_name``, whether by ``from pkg.mod import _name`` or by ``mod._name`` on an imported
module. Names private to a module are its own; use or export a public one instead."""
from __future__ import annotations

import ast
import importlib.util

from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class NoPrivateNamesContract(Contract):
    """``source_modules``: the packages whose modules are checked (every module below them)."""

    type_name = "no_private_names"
    source_modules = fields.SetField(subfield=fields.ModuleExpressionField())

    def check(self, graph, verbose: bool) -> ContractCheck:
        roots = [expr.expression for expr in self.source_modules]  # type: ignore[attr-defined]
        modules = sorted(m for m in graph.modules if any(m == r or m.startswith(r + ".") for r in roots))
        found = []
        for module in modules:
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.origin or not spec.origin.endswith(".py"):
                continue
            with open(spec.origin) as f:
                tree = ast.parse(f.read(), spec.origin)
            found += [f"{module}:{line} {what}" for line, what in _violations(tree, module, graph.modules)]
        return ContractCheck(kept=not found, metadata={"found": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        from importlinter.application import output

        for line in check.metadata["found"]:
            output.print_error(f"- {line}", bold=False)


def _violations(tree: ast.AST, module: str, known: set) -> list[tuple[int, str]]:
    package = module.rsplit(".", 1)[0]
    aliases: dict[str, str] = {}  # local name -> an imported module of the project
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known:
                    aliases[(a.asname or a.name).split(".")[0] if not a.asname else a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module is not None or (
                isinstance(node, ast.ImportFrom) and node.level):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: -node.level] if node.level <= module.count(".") else []
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                target = f"{base}.{a.name}"
                if target in known:
                    aliases[a.asname or a.name] = target
                elif base in known and base != module and _private(a.name):
                    out.append((node.lineno, f"imports {a.name} from {base}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name):
            target = aliases.get(node.value.id)
            if target is not None and target != module and target != package + "." + module.rsplit(".", 1)[-1]:
                out.append((node.lineno, f"reads {target}.{node.attr}"))
    return out
