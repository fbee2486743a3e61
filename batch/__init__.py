"""Queued batch renders: subjects x prompts x seeds through a running ComfyUI's HTTP API.

Runs on the client side (a laptop talking to a remote GPU host): standard library plus
``requests`` and, when installed, ``websocket-client`` (progress over ``/ws``) and ``tqdm``
(the progress bar). It never imports torch or the host's modules.

    python path/to/this/pack/batch BATCH_FILE --url http://host:8188 --out renders/

See docs/batch.md for the batch file format and the resume semantics.
"""


def main(argv=None) -> int:
    from .cli import main as _main  # lazy: ``python -m batch`` imports this file as top-level ``batch``

    return _main(argv)
