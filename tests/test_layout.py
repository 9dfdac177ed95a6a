"""The repository's layout rules that import-linter cannot express by itself."""
import ast
import os
import re
import textwrap

from tests.support import ROOT
from tools.import_contracts import _violations

KNOWN = {"ivfast", "ivfast.ops", "ivfast.ops.dispatch", "ivfast.ops.launch", "ivfast.data", "ivfast.data.video_list"}


def _found(code: str, module: str = "ivfast.models.x") -> list[str]:
    return [what for _, what in _violations(ast.parse(textwrap.dedent(code)), module, KNOWN)]


def test_private_names_of_other_modules_are_found():
    assert _found("from ivfast.data.video_list import _open") == ["imports _open from ivfast.data.video_list"]
    assert _found("from ivfast.ops import dispatch\ndispatch._state") == ["reads ivfast.ops.dispatch._state"]
    assert _found("import ivfast.ops.launch as L\nL._x") == ["reads ivfast.ops.launch._x"]
    assert _found("from ..ops.dispatch import _state", "ivfast.models.x") == ["imports _state from ivfast.ops.dispatch"]


def test_public_names_dunders_and_own_privates_pass():
    assert _found("from ivfast.data.video_list import open_video, __doc__") == []
    assert _found("from ivfast.ops import dispatch\ndispatch.use_triton\nself._x") == []
    assert _found("from ivfast.ops.dispatch import _state", "ivfast.ops.dispatch") == []


def test_no_top_level_kernels_package_and_one_deepspeed_initialize():
    """One call site in the repository, scripts held in strings (subprocess tests) included."""
    assert not os.path.exists(os.path.join(ROOT, "kernels"))
    call = re.compile(r"\bdeepspeed\s*\.\s*initialize\s*\(")
    sites = []
    for top in ("ivfast", "benchmarks", "tests", "tools"):
        for r, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                path = os.path.join(r, f)
                if f.endswith((".py", ".sh")) and os.path.abspath(path) != os.path.abspath(__file__):
                    with open(path) as fh:
                        sites += [os.path.relpath(path, ROOT) for _ in call.finditer(fh.read())]
    assert sites == [os.path.join("ivfast", "training", "engine.py")]
