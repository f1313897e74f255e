"""The pyproject package list covers every package folder, so that installs ship all of partita."""
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_package_folder_is_listed_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = set()
    for top_name, folder in tool["package-dir"].items():
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
                found.add(top_name if rel == "." else f"{top_name}.{rel.replace(os.sep, '.')}")
    assert found - listed == set(), "add these packages to pyproject's [tool.setuptools] packages"
    assert listed - found == set(), "pyproject lists packages that have no __init__.py"


def test_no_pickle_on_any_wire():
    """CONVENTIONS.md, Safety: no pickle, recv_pyobj or torch.load of untrusted bytes anywhere in the tree."""
    banned = ("pickle.loads", "pickle.load(", "recv_pyobj", "torch.load(", "cloudpickle.loads")
    offenders = []
    for folder in ("cluster", "workers", "kernels", "protos", "client"):
        for dirpath, _, filenames in os.walk(os.path.join(ROOT, folder)):
            for name in filenames:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                    offenders += [f"{path}: {b}" for b in banned if b in text]
    assert offenders == []
