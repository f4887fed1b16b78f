"""The package's layers: imports point down only (read from the source, every import counted,
those inside functions too).

  entries      main, linear_eval, prepare_data, sweep, curves, convert, propagate
  training/  evaluation/  interop/
  method/  models/  data/
  runtime/
  defaults     (plain config data)
"""
import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "cacl_jax"
ENTRIES = {"main", "linear_eval", "prepare_data", "sweep", "curves", "convert", "propagate"}
RANK = {"defaults": 0, "runtime": 1, "method": 2, "models": 2, "data": 2,
        "training": 3, "evaluation": 3, "interop": 3, **{e: 4 for e in ENTRIES}, "losses": 4}


def _modules():
  """{'cacl_jax.x.y': path} for every module of the package."""
  found = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return found


def _imports(path: pathlib.Path) -> set[str]:
  """Every module `path` imports (absolute names; `from a import b` gives a.b if that is a
  module of the package, else a)."""
  names, modules = set(), _modules()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        names.add(full if full in modules else node.module)
  return names


def _layer(module: str) -> str:
  """'cacl_jax.training.step' → 'training'; 'cacl_jax.main' → 'main'."""
  return module.split(".")[1] if module.count(".") else ""


def _internal_imports():
  for module, path in sorted(_modules().items()):
    yield module, path, sorted(n for n in _imports(path) if n.startswith("cacl_jax."))


def test_the_top_level_holds_the_entries_and_little_else():
  top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
  assert set(top) == ENTRIES | {"defaults", "losses"}, top
  assert len(top) <= 12


def test_imports_point_down_only():
  wrong = [f"{module} imports {name}" for module, _, names in _internal_imports()
           for name in names if _layer(module) and RANK[_layer(name)] > RANK[_layer(module)]]
  assert not wrong, "\n".join(wrong)


def test_runtime_never_imports_the_method_models_or_training():
  wrong = [f"{module} imports {name}" for module, _, names in _internal_imports()
           if _layer(module) == "runtime" for name in names
           if _layer(name) not in ("runtime", "defaults")]
  assert not wrong, "\n".join(wrong)


def test_method_imports_only_jax_numpy_and_the_standard_library():
  allowed = {"jax", "numpy", "cacl_jax"} | set(sys.stdlib_module_names)
  wrong = [f"{module} imports {name}" for module, path in sorted(_modules().items())
           if _layer(module) == "method" for name in sorted(_imports(path))
           if name.split(".")[0] not in allowed
           or (name.startswith("cacl_jax.") and _layer(name) != "method")]
  assert not wrong, "\n".join(wrong)


def test_nothing_imports_an_entry_or_the_public_losses_path():
  public = {f"cacl_jax.{e}" for e in ENTRIES} | {"cacl_jax.losses"}
  wrong = [f"{module} imports {name}" for module, _, names in _internal_imports()
           for name in names if name in public]
  assert not wrong, "\n".join(wrong)


def test_the_rules_catch_an_upward_import(tmp_path, monkeypatch):
  """The checker itself: a runtime module importing the step is found."""
  fake = tmp_path / "cacl_jax"
  (fake / "runtime").mkdir(parents=True)
  (fake / "training").mkdir()
  (fake / "runtime" / "bad.py").write_text("def f():\n  from cacl_jax.training import step\n")
  (fake / "training" / "step.py").write_text("")
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
  assert list(_internal_imports()) == [
      ("cacl_jax.runtime.bad", fake / "runtime" / "bad.py", ["cacl_jax.training.step"]),
      ("cacl_jax.training.step", fake / "training" / "step.py", [])]
  try:
    test_runtime_never_imports_the_method_models_or_training()
  except AssertionError as e:
    assert "cacl_jax.runtime.bad imports cacl_jax.training.step" in str(e)
  else:
    raise AssertionError("an upward import was not caught")
