"""The registry package: comfy-cli's own `comfy node validate` and `comfy node pack` pass, the zip
is the pack as it runs (and nothing else), and the metadata asks installers for nothing the host
already has.

comfy-cli comes from PyPI into its own venv (scripts/setup_comfy_cli.sh). It packs the files git
tracks, less `.comfyignore`, so it runs in a git copy of this working tree (tracked files plus
untracked ones git does not ignore: what a commit of the tree would hold; on CI's fresh clone,
exactly the commit). Nothing is written into the repository.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from paths import CACHE, ROOT

COMFY = CACHE / "comfy-cli-venv" / "bin" / "comfy"

# Folders that ship whole: the nodes and their core, the frontend's help pages, the workflows
# (UI templates, API twins, sample photos the nodes copy into input/), the docs the README links,
# and the client-side batch tool with the HTTP client it uses.
SHIPPED_DIRS = ("nodes", "blip_core", "web", "example_workflows", "workflows", "docs", "batch", "api")
SHIPPED_FILES = ("__init__.py", "pyproject.toml", "README.md", "LICENSE",
                 "scripts/_pack.py")  # batch/__main__.py imports it when run as a script
DEV_ONLY = ("tests/", "bench/", "scripts/", ".cache/", ".ci/", "output/", ".git/")
MAX_FILE_BYTES = 2 * 2**20
MAX_ZIP_BYTES = 8 * 2**20
HOST_CODE = ("__init__.py", "nodes/", "blip_core/")  # what ComfyUI imports from the pack
CLIENT_CODE = ("batch/", "api/")  # runs beside the host, with the `batch` extra
RAY_CODE = ("batch/ray_servers.py",)  # batch --ray: the `ray` extra


@dataclass
class Packed:
    tree: Path
    tracked: list[str]
    validate: subprocess.CompletedProcess
    pack: subprocess.CompletedProcess
    names: list[str]
    infos: list[zipfile.ZipInfo]
    zip_path: Path


def _git_env() -> dict:
    # A git hook's GIT_DIR / GIT_INDEX_FILE would point git at another repository.
    return {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}


def _copy_tree(dest: Path) -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, env=_git_env(), capture_output=True, check=True).stdout
    files = sorted({f for f in listed.decode().split("\0") if f and (ROOT / f).is_file()})
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, env=_git_env(), check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, env=_git_env(), check=True)
    return subprocess.run(["git", "ls-files"], cwd=dest, env=_git_env(), capture_output=True, text=True,
                          check=True).stdout.split()


def _comfy(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = _git_env()
    env.update(HOME=str(home),            # comfy-cli keeps its config under ~/.config/comfy-cli
               XDG_CONFIG_HOME=str(home / ".config"),
               DO_NOT_TRACK="1", COMFY_NO_TELEMETRY="1",  # no telemetry, no consent prompt
               RUFF_NO_CACHE="true")      # validate runs ruff, which would leave .ruff_cache/
    # --skip-prompt: never ask; --no-json: the human-readable output the assertions read.
    return subprocess.run([str(COMFY), "--skip-prompt", "--no-json", *args], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Packed:
    setup = subprocess.run(["bash", str(ROOT / "scripts" / "setup_comfy_cli.sh")], capture_output=True,
                           text=True, timeout=900)
    assert setup.returncode == 0, setup.stdout[-2000:] + setup.stderr[-4000:]
    base = tmp_path_factory.mktemp("packaging")
    tree = base / "blip-diffusion"
    tree.mkdir()
    home = base / "home"
    home.mkdir()
    tracked = _copy_tree(tree)
    validate = _comfy(["node", "validate"], tree, home)
    pack = _comfy(["node", "pack"], tree, home)
    zip_path = tree / "node.zip"
    assert zip_path.is_file(), pack.stdout + pack.stderr
    with zipfile.ZipFile(zip_path) as z:
        infos = z.infolist()
    return Packed(tree, tracked, validate, pack, [i.filename for i in infos], infos, zip_path)


def _output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def test_validate_passes(packed):
    out = _output(packed.validate)
    assert packed.validate.returncode == 0, out
    assert "All validation checks passed" in out, out
    # comfy-cli reports bad classifiers, requires-comfyui, license and security findings
    # (exec, eval, `a; b`) as warnings and still exits 0.
    assert not re.search(r"warning|error", out, re.I), out


def test_pack_passes(packed):
    out = _output(packed.pack)
    assert packed.pack.returncode == 0, out
    assert "Created zip file: node.zip" in out, out
    assert not re.search(r"warning|error|not found", out, re.I), out


def test_zip_holds_the_pack(packed):
    names = set(packed.names)
    expected = {f for f in packed.tracked if f.split("/")[0] in SHIPPED_DIRS} | set(SHIPPED_FILES)
    assert not expected - names, f"missing from the zip: {sorted(expected - names)}"
    # The folders the host and its frontend read, by kind, so an empty folder cannot pass.
    for pattern in ("nodes/*.py", "blip_core/*.py", "blip_core/data/*", "web/docs/*.md",
                    "workflows/api/*.json", "workflows/assets/*.png"):
        assert any(PurePosixPath(n).match(pattern) for n in names), pattern
    if (packed.tree / "example_workflows").is_dir():
        assert any(PurePosixPath(n).match("example_workflows/*.json") for n in names)
    assert "from _pack import" in (packed.tree / "batch" / "__main__.py").read_text()


def _module_files(module: PurePosixPath) -> tuple[str, str]:
    return f"{module}.py", f"{module}/__init__.py"


def test_zip_is_self_contained(packed):
    """Every relative import in the zip's Python lands in the zip; so does every README link
    that is not to a development-only folder."""
    names = set(packed.names)
    with zipfile.ZipFile(packed.zip_path) as z:
        sources = {n: z.read(n).decode() for n in names if n.endswith(".py")}
        readme = z.read("README.md").decode()
    missing = []
    for name, source in sources.items():
        package = PurePosixPath(name).parent
        for node in ast.walk(ast.parse(source, name)):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package
            for _ in range(node.level - 1):
                base = base.parent
            target = base.joinpath(*node.module.split(".")) if node.module else base
            if node.module:
                if not names & set(_module_files(target)):
                    missing.append(f"{name}: {'.' * node.level}{node.module}")
            else:  # from . import a, b: submodules (or names of the package itself)
                for alias in node.names:
                    if not names & {*_module_files(target / alias.name), f"{target}/__init__.py"}:
                        missing.append(f"{name}: {'.' * node.level} {alias.name}")
    assert not missing, missing
    links = re.findall(r"\]\(([^)#\s]+)", readme)
    local = [link for link in links if "://" not in link and not link.startswith("mailto:")]
    assert local, "the README links nothing local: the pattern is stale"
    dangling = [link for link in local
                if link not in names and not any(n.startswith(link.rstrip("/") + "/") for n in names)
                and not link.startswith(DEV_ONLY)]
    assert not dangling, dangling


def test_zip_has_no_development_files(packed):
    bad = [n for n in packed.names
           if (n.startswith(DEV_ONLY) and n not in SHIPPED_FILES)
           or "__pycache__" in n.split("/") or n.endswith((".pyc", ".pyo"))
           or "node_modules" in n.split("/") or n == "node.zip"]
    assert not bad, bad
    big = [(i.filename, i.file_size) for i in packed.infos if i.file_size > MAX_FILE_BYTES]
    assert not big, big
    assert packed.zip_path.stat().st_size < MAX_ZIP_BYTES


REGISTER = r"""
import asyncio, importlib.util, json, sys
comfy_root, packed, tree, scratch = sys.argv[1:5]
sys.path.append(comfy_root)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import folder_paths
folder_paths.set_input_directory(scratch + "/input")
folder_paths.set_output_directory(scratch + "/output")
folder_paths.set_temp_directory(scratch + "/temp")

def node_names(folder, name):
    spec = importlib.util.spec_from_file_location(name, folder + "/__init__.py",
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    extension = asyncio.run(module.comfy_entrypoint())
    return sorted(n.__name__ for n in asyncio.run(extension.get_node_list()))

print(json.dumps({"packed": node_names(packed, "packed_pack"), "tree": node_names(tree, "tree_pack")}))
"""


def test_unzipped_pack_registers_its_nodes(packed, tmp_path):
    """Unzipped as a custom_nodes/ folder, the pack registers the same nodes as the repository,
    and its batch tool starts."""
    import json

    from blip_diffusion.api.server import comfyui_dir

    folder = tmp_path / "custom_nodes" / "blip-diffusion"
    with zipfile.ZipFile(packed.zip_path) as z:
        z.extractall(folder)
    proc = subprocess.run([sys.executable, "-c", REGISTER, str(comfyui_dir()), str(folder), str(packed.tree),
                           str(tmp_path / "scratch")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["packed"] and result["packed"] == result["tree"], result
    cli = subprocess.run([sys.executable, str(folder / "batch"), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert cli.returncode == 0 and "--url" in cli.stdout, cli.stdout + cli.stderr


# -- metadata --------------------------------------------------------------------------------

def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _host_requirements() -> list:
    from packaging.requirements import Requirement

    from blip_diffusion.api.server import comfyui_dir

    lines = (comfyui_dir() / "requirements.txt").read_text().splitlines()
    return [Requirement(line.split(" #")[0].strip()) for line in lines if line.strip() and not line.startswith("#")]


def _host_brought() -> set[str]:
    """Distributions the host installs: its requirements.txt and, from the installed metadata,
    everything those require in turn (torch brings typing_extensions, for example)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [_canonical(r.name) for r in _host_requirements()]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_canonical(req.name))
    return seen


def test_dependencies_ask_for_nothing_the_host_has():
    from packaging.requirements import Requirement

    project = _pyproject()["project"]
    deps = {_canonical(Requirement(d).name) for d in project["dependencies"]}
    assert not deps & {"torch", "torchvision", "torchaudio", "comfyui-frontend-package"}, deps
    assert not deps & _host_brought(), f"the host already brings {sorted(deps & _host_brought())}"


def test_requires_comfyui_is_the_tested_host():
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    from blip_diffusion.api.server import comfyui_dir

    spec = _pyproject()["tool"]["comfy"]["requires-comfyui"]
    version = re.search(r'__version__ = "([^"]+)"', (comfyui_dir() / "comfyui_version.py").read_text())[1]
    assert Version(version) in SpecifierSet(spec), (version, spec)
    if not os.environ.get("COMFYUI_DIR"):  # the host scripts/setup_host.sh provisions is the floor
        assert spec == f">={version}", (spec, version)
    classifiers = _pyproject()["project"]["classifiers"]
    assert any(c.startswith("Operating System :: ") for c in classifiers), classifiers
    # An accelerator classifier becomes the registry's supported_accelerators, which the node manager
    # matches against "CUDA"/"CPU"/...: "GPU :: NVIDIA CUDA" would mark the pack conflicting everywhere.
    assert not any(c.startswith("Environment :: GPU :: ") for c in classifiers), classifiers


OPTIONAL_HANDLER = r"\b(ImportError|ModuleNotFoundError|Exception)\b"


def _third_party_imports(sources: dict[str, str], host_modules: set[str]) -> dict[str, bool]:
    """Top-level modules imported absolutely -> whether every import of it is optional (inside a
    try whose handler catches ImportError)."""
    own = {"blip_diffusion", "_pack"}
    found: dict[str, bool] = {}

    def visit(node, guarded):
        if isinstance(node, ast.Try):
            catches = any(h.type is None or re.search(OPTIONAL_HANDLER, ast.dump(h.type)) for h in node.handlers)
            for child in node.body:
                visit(child, guarded or catches)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, guarded)
            return
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in host_modules or top in own or top == "__future__":
                continue
            found[top] = found.get(top, True) and guarded
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    for name, source in sources.items():
        visit(ast.parse(source, name), False)
    return found


def test_every_runtime_import_is_provided():
    """What the host imports from the pack needs only the host's requirements (or `dependencies`);
    the batch client needs only the `batch` extra."""
    from importlib import metadata

    from packaging.requirements import Requirement

    from blip_diffusion.api.server import comfyui_dir

    host = comfyui_dir()
    host_modules = {p.stem if p.suffix == ".py" else p.name for p in host.iterdir()
                    if p.suffix == ".py" or (p.is_dir() and any(p.glob("*.py")))}
    project = _pyproject()["project"]
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                             env=_git_env(), capture_output=True, text=True, check=True).stdout.split()
    by_module = metadata.packages_distributions()

    def providers(module):
        dists = by_module.get(module)
        assert dists, f"{module}: imported but installed by no distribution here"
        return {_canonical(d) for d in dists}

    def sources(prefixes):
        return {f: (ROOT / f).read_text() for f in tracked
                if f.startswith(prefixes) and (ROOT / f).is_file()}

    allowed = _host_brought() | {_canonical(Requirement(d).name) for d in project["dependencies"]}
    host_side = _third_party_imports(sources(HOST_CODE), host_modules)
    assert {"torch", "numpy", "safetensors"} <= set(host_side), host_side  # the walk sees imports
    unprovided = {m: providers(m) for m in host_side if not providers(m) & allowed}
    assert not unprovided, f"imported in the host but not brought by it: {unprovided}"

    for code, extra_name, exclude in ((CLIENT_CODE, "batch", RAY_CODE), (RAY_CODE, "ray", ())):
        extra = {_canonical(Requirement(d).name) for d in project["optional-dependencies"][extra_name]}
        client_side = _third_party_imports({f: t for f, t in sources(code).items() if f not in exclude},
                                           host_modules)
        unprovided = {m: providers(m) for m, optional in client_side.items()
                      if not optional and not providers(m) & extra}
        assert not unprovided, f"{code} imports what the {extra_name!r} extra lacks: {unprovided}"
    assert "ray" in _third_party_imports(sources(RAY_CODE), host_modules)  # the walk sees it
