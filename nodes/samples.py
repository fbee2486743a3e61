"""The shipped workflows' sample photos, put into the host's input folder when the pack loads.

A workflow opened from the template browser names its photos (``sample_subject.png`` ...) in its
LoadImage nodes; a fresh install's ``input/`` has none of them. Each one the folder lacks is
copied there, so every shipped workflow runs as opened. A file of that name already in ``input/``
is the user's and is never replaced (the copy is created exclusively, not moved over it).
"""
import logging
import os
import shutil
import tempfile

import folder_paths

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows", "assets")
SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def sample_names() -> list[str]:
    return sorted(n for n in os.listdir(ASSETS) if n.lower().endswith(SAMPLE_SUFFIXES))


def provide_sample_inputs(input_dir: str | None = None) -> list[str]:
    """Copy the samples ``input_dir`` lacks into it; return the names copied."""
    input_dir = input_dir or folder_paths.get_input_directory()
    copied = []
    try:
        os.makedirs(input_dir, exist_ok=True)
        for name in sample_names():
            dest = os.path.join(input_dir, name)
            if os.path.lexists(dest):
                continue
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=input_dir)
            try:
                with os.fdopen(fd, "wb") as out, open(os.path.join(ASSETS, name), "rb") as src:
                    shutil.copyfileobj(src, out)
                os.link(tmp, dest)  # appears whole or not at all, and fails rather than replace a file
                copied.append(name)
            except FileExistsError:
                pass  # the user's (or another server's) file won the race: keep it
            except OSError:  # a filesystem without hard links: create it exclusively instead
                with open(dest, "xb") as out, open(os.path.join(ASSETS, name), "rb") as src:
                    shutil.copyfileobj(src, out)
                copied.append(name)
            finally:
                os.unlink(tmp)
    except OSError as err:  # a read-only input folder must not stop the pack from loading
        logging.warning("BLIP-Diffusion: could not put the sample photos into %s (%s); the shipped workflows "
                        "name %s", input_dir, err, ", ".join(sample_names()))
        return copied
    if copied:
        logging.info("BLIP-Diffusion: sample photos for the shipped workflows put into %s: %s",
                     input_dir, ", ".join(copied))
    return copied
