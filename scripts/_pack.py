"""Import the pack folder as package ``blip_diffusion``, whatever the folder is called.

The root holds a ``nodes`` package; putting the root itself on sys.path would shadow the
host's ``nodes.py``, so the folder is registered as a package instead.
"""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "blip_diffusion"


def import_pack():
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module
