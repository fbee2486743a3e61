"""Command line: python path/to/pack/batch BATCH_FILE --url URL --out DIR [options]."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .graph import DEFAULT_WORKFLOW, TemplateError
from .manifest import FolderLock, Manifest
from .runner import EXIT_HOST, EXIT_INTERRUPTED, EXIT_USAGE, Runner
from .spec import BatchFileError, load_batch
from .template import Template

EPILOG = """\
batch file (JSON lines, JSON or CSV; relative image paths are relative to the batch file):
  {"image": "dog.jpg", "category": "dog", "prompt": "swimming underwater", "seed": 1}
  {"subjects": [{"image": "dog.jpg", "category": "dog"}, {"image": "pot.png", "category": "teapot"}],
   "prompts": ["on the beach", "in the snow"], "seeds": [0, 1], "steps": 25, "size": 512}
  CSV columns: id,image,category,prompt,seed,steps,size,width,height,negative,cfg,target_category

exit status: 0 all done, 1 some item failed, 2 bad arguments or batch file, 3 host unreachable,
130 interrupted. Run the same command again to resume. Details: docs/batch.md
"""


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="batch", description="Queued BLIP-Diffusion renders on a running ComfyUI.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("batch_file", type=Path, help="items to render (.jsonl, .json or .csv)")
    ap.add_argument("--url", default=os.environ.get("COMFYUI_URL", "http://127.0.0.1:8188"),
                    help="the ComfyUI host (default: $COMFYUI_URL or http://127.0.0.1:8188)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the images and manifest.json")
    ap.add_argument("--workflow", type=Path, default=None,
                    help="your own API workflow (Export (API)) to render each item with; what it fills is found by the "
                         "graph's links, see docs/batch.md (default: "
                         f"{DEFAULT_WORKFLOW.relative_to(DEFAULT_WORKFLOW.parents[2])})")
    ap.add_argument("--model", default=None,
                    help="model folder name for the loader (default: the workflow's, or the host's only one)")
    ap.add_argument("--steps", type=int, help="steps for items that give none (default: the workflow's)")
    ap.add_argument("--size", help="N or WxH for items that give none (default: the workflow's)")
    ap.add_argument("--cfg", type=float, help="guidance scale for items that give none (default: the workflow's)")
    ap.add_argument("--negative", help="negative prompt for items that give none (default: the workflow's)")
    ap.add_argument("--ahead", type=int, default=3, help="prompts kept queued on the host at once (default 3)")
    ap.add_argument("--no-retry-failed", action="store_true", help="on resume, leave items that failed before")
    ap.add_argument("--keep-queued", action="store_true",
                    help="on Ctrl-C leave queued prompts on the host (the next run collects them) "
                         "instead of taking them off its queue")
    ap.add_argument("--retry-for", type=float, default=120.0,
                    help="seconds to keep retrying an unreachable host before stopping (default 120)")
    ap.add_argument("--force", action="store_true",
                    help="resume in a folder whose earlier renders used another workflow or model")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    ap.add_argument("--dry-run", action="store_true", help="list the items in queue order and exit")
    return ap.parse_args(argv)


def err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        template = Template(a.workflow)
    except TemplateError as e:
        err(f"error: {e}")
        return EXIT_USAGE
    defaults = template.defaults()
    overrides = {"steps": a.steps, "cfg": a.cfg, "negative": a.negative}
    defaults.update({k: v for k, v in overrides.items() if v is not None})
    try:
        if a.size:
            w, _, h = a.size.lower().partition("x")
            defaults["width"], defaults["height"] = int(w), int(h or w)
        items, warnings = load_batch(a.batch_file, defaults)
    except ValueError:
        err(f"error: --size must be N or WxH, got {a.size!r}")
        return EXIT_USAGE
    except BatchFileError as e:
        err(f"error: {e}")
        return EXIT_USAGE
    for w in warnings:
        err(f"warning: {w}")
    for f in template.unused(items):
        err(f"warning: items set {f!r} but {template.path.name} has nowhere to put it (see docs/batch.md, "
            "Your own workflow); the workflow's own value is used")


    if a.dry_run:
        subjects = {}
        for item in items:
            subjects.setdefault(item.subject_key, item)
        err(f"template {template.path}: {template.describe()}")
        print(f"{len(items)} item(s), {len(subjects)} subject(s), queue order:")
        for item in items:
            missing = "" if item.image_sha256 else "   [image not found]"
            print(f"{item.id}\t{item.category}\t{item.prompt!r}\tseed {item.seed}\t{item.steps} steps\t"
                  f"{item.width}x{item.height}{missing}")
        return 0

    a.out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(a.out)
    if not lock.acquire():
        err(f"error: another batch run is using {a.out} (see {lock.path})")
        return EXIT_USAGE
    try:
        return _run(a, template, items)
    except KeyboardInterrupt:
        err("interrupted; the manifest keeps every finished and queued item: run the same command to resume")
        return EXIT_INTERRUPTED
    finally:
        lock.release()


def _run(a, template: Template, items) -> int:
    import requests

    from .host import BatchClient, HostUnreachable

    try:
        manifest = Manifest(a.out).load()
    except RuntimeError as e:
        err(f"error: {e}")
        return EXIT_USAGE
    client = BatchClient(a.url, manifest.batch_id, retry_for=a.retry_for)
    model = a.model
    try:
        if template.has("model"):
            loader = template.loader_class()
            available = client.loader_models(loader)
            if available is None:
                err(f"error: the host at {a.url} has no {loader} node: install this pack in its custom_nodes/")
                return EXIT_USAGE
            wanted = model or template.value("model")
            if wanted not in available:
                if model is None and len(available) == 1:
                    model = available[0]
                    err(f"note: using the host's only model {model!r} (the workflow names {wanted!r})")
                else:
                    err(f"error: model {wanted!r} is not on the host; it has {available or 'none'} (use --model)")
                    return EXIT_USAGE
            model = model or wanted
        try:
            argv = (client.get("/system_stats").json().get("system") or {}).get("argv") or []
        except HostUnreachable:
            raise
        except Exception:  # noqa: BLE001 - only for a warning
            argv = []
        if "--cache-none" in argv:
            err("warning: the host runs with --cache-none: every render encodes its subject again")
    except (HostUnreachable, requests.RequestException) as e:
        err(f"error: cannot talk to the host: {e}")
        return EXIT_HOST

    fingerprint = {"workflow": str(template.path), "workflow_sha256": template.sha256, "model": model}
    earlier = manifest.header.get("template")
    if earlier and (earlier.get("workflow_sha256"), earlier.get("model")) != (template.sha256, model) and \
            any(r.get("status") == "done" for r in manifest.records.values()) and not a.force:
        err(f"error: {a.out} holds renders made with workflow {earlier.get('workflow')} "
            f"(sha256 {str(earlier.get('workflow_sha256'))[:12]}) and model {earlier.get('model')!r}; now "
            f"{template.path} (sha256 {template.sha256[:12]}) and {model!r}. Use another --out, or --force.")
        return EXIT_USAGE
    manifest.header.update(batch_file=str(a.batch_file.resolve()), host=a.url, template=fingerprint)
    runner = Runner(client, manifest, items, template, model, a.out, ahead=a.ahead,
                    retry_failed=not a.no_retry_failed, cancel_on_stop=not a.keep_queued,
                    progress=not a.no_progress, log=err)
    err(f"batch {manifest.batch_id[:8]}: {len(items)} item(s) -> {a.out} on {a.url}")
    return runner.run()

