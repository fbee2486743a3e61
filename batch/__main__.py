"""Entry point: ``python path/to/pack/batch ...`` (or ``python -m batch`` from the pack folder,
or ``python -m <package>.batch`` where the pack is importable as a package).

The pack folder may have any name (a clone), so when run as a script the pack is imported as
package ``blip_diffusion`` by scripts/_pack.py, as the other scripts do; nothing under it
imports torch.
"""
import sys
from pathlib import Path

if __package__ in (None, "", "batch"):
    _here = Path(__file__).resolve().parent
    # As a script, sys.path[0] is this folder: its module names must not shadow anything.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent / "scripts"))
    from _pack import import_pack

    import_pack()
    from blip_diffusion.batch.cli import main
else:
    from .cli import main

if __name__ == "__main__":
    sys.exit(main())
