"""The interpreter-start hook: activates on `import mindformers`, costs nothing before, never raises."""
import ast
import glob
import json
import os
import site
import sys

import pytest

from mindformers_lora_ext import _boot
from conftest import run_fresh

PROBE = ("import json, sys; import mindformers.pet.pet_model as m; "
         "print(json.dumps('lora_ext' in m.PET_TYPE_TO_MODEL_MAPPING))")


def test_pth_file_is_installed():
    dirs = site.getsitepackages() + [site.getusersitepackages()]
    found = [d for d in dirs if os.path.isfile(os.path.join(d, "mindformers_lora_ext_boot.pth"))]
    assert found, f"mindformers_lora_ext_boot.pth in none of {dirs}"
    with open(os.path.join(found[0], "mindformers_lora_ext_boot.pth"), encoding="utf-8") as handle:
        assert handle.read().strip() == "import mindformers_lora_ext._boot"


def test_fresh_interpreter_sees_our_pet_type(tmp_path):
    proc = run_fresh(["-c", PROBE], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) is True


def test_disable_env_var(tmp_path):
    proc = run_fresh(["-c", PROBE], cwd=str(tmp_path), env={_boot.DISABLE_ENV: "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) is False


def test_startup_imports_only_the_standard_library(tmp_path):
    code = ("import sys; heavy = [m for m in ('mindformers', 'mindspore', 'numpy', "
            "'mindformers_lora_ext.registry') if m in sys.modules]; "
            "print(repr(heavy), 'mindformers_lora_ext._boot' in sys.modules)")
    proc = run_fresh(["-c", code], cwd=str(tmp_path))
    assert proc.stdout.split() == ["[]", "True"], proc.stdout + proc.stderr[-2000:]


def test_hook_never_raises(monkeypatch, capsys):
    from mindformers_lora_ext import registry

    def explode():
        raise RuntimeError("plugin loader exploded")
    monkeypatch.setattr(registry, "load_plugins", explode)
    _boot._after_mindformers_import()  # must not raise
    err = capsys.readouterr().err
    assert "plugins not loaded (RuntimeError: plugin loader exploded)" in err
    assert _boot.DISABLE_ENV in err


def test_finder_ignores_other_modules_and_restores_the_real_loader(tmp_path):
    code = ("import sys, mindformers; "
            "print(type(mindformers.__loader__).__name__, type(mindformers.__spec__.loader).__name__, "
            "any(type(f).__name__ == 'type' and f.__name__ == '_MindFormersFinder' for f in sys.meta_path))")
    proc = run_fresh(["-c", code], cwd=str(tmp_path))
    out = proc.stdout.strip().splitlines()[-1].split()
    assert out[:2] == ["SourceFileLoader", "SourceFileLoader"] and out[2] == "False", proc.stdout
    assert sys.modules["mindformers"].__loader__.__class__.__name__ != "_LoaderProxy"


def _top_level_imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names, tree


def test_modules_that_import_mindformers_at_import_time_resume_the_hook():
    """Static rule behind the deferred plugin load (see _boot.resume_after_import)."""
    pkg_dir = os.path.dirname(_boot.__file__)
    modules = {}
    for path in glob.glob(os.path.join(pkg_dir, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, os.path.dirname(pkg_dir))[:-3].replace(os.sep, ".")
        modules[rel.removesuffix(".__init__")] = _top_level_imports(path)

    def pulls_mindformers(name, seen=()):
        imports = modules[name][0]
        return any(i == "mindformers" or i.startswith("mindformers.") for i in imports) or any(
            i in modules and i not in seen and pulls_mindformers(i, seen + (name,)) for i in imports)

    offenders = []
    for name, (_, tree) in modules.items():
        if name == "mindformers_lora_ext" or not pulls_mindformers(name):
            continue
        last = ast.unparse(tree.body[-1])
        if last != "_boot.resume_after_import(__name__)":
            offenders.append(name)
    assert offenders == []


@pytest.mark.e2e
@pytest.mark.parametrize("module", ["mindformers_lora_ext.tuners.lora", "mindformers_lora_ext.wrappers"])
def test_importing_our_module_first_still_loads_plugins(tmp_path, module):
    code = (f"import json, {module}; from mindformers_lora_ext import registry; "
            "from mindformers.pet import is_supported_pet_type; "
            "print(json.dumps([is_supported_pet_type('lora_ext'), "
            "[(s.name, s.ok) for s in registry.plugin_statuses()]]))")
    proc = run_fresh(["-c", code], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [True, [["mindformers_lora_ext", True]]]
