"""Command line: python path/to/pack/batch BATCH_FILE --url URL --out DIR [options]."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .graph import DEFAULT_WORKFLOW, TemplateError
from .host import HostUnreachable
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
    ap.add_argument("--url", action="append", default=None,
                    help="a ComfyUI server; repeat it to spread the batch over several (default: $COMFYUI_URL or "
                         "http://127.0.0.1:8188)")
    ap.add_argument("--urls-file", type=Path, default=None,
                    help="a file of server URLs, one a line ('#' starts a comment); adds to --url")
    ray = ap.add_argument_group("Ray cluster (docs/batch.md, Many machines on Ray; needs pip install ray)")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="start the servers on a Ray cluster, one per GPU, and spread the batch over them (and "
                          "over any --url); ADDRESS as ray.init takes it (default: the cluster this machine "
                          "belongs to, else a local Ray instance)")
    ray.add_argument("--ray-servers", type=int, default=None, metavar="N",
                     help="how many servers (default: one per GPU of the cluster; needed on a cluster without GPUs)")
    ray.add_argument("--comfyui", default=None, metavar="DIR",
                     help="the ComfyUI folder on every node, with this pack in custom_nodes/ and the model in "
                          "models/ (default: $COMFYUI_DIR on the node)")
    ray.add_argument("--comfyui-args", default="", metavar="ARGS",
                     help="more arguments for each server's main.py, '{actor}' replaced by the server's number "
                          "(e.g. \"--base-directory /data/comfy{actor}\")")
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
    ap.add_argument("--ahead", type=int, default=3,
                    help="prompts kept queued on each server at once (default 3)")
    ap.add_argument("--batch-size", type=int, default=1,
                    help="render up to N items that differ only in their seed as one latent batch (one prompt; "
                         "faster on a GPU); the first item's seed seeds the batch and the manifest records each "
                         "image's seed, batch size and index (default 1: each item its own seed)")
    ap.add_argument("--no-retry-failed", action="store_true", help="on resume, leave items that failed before")
    ap.add_argument("--keep-queued", action="store_true",
                    help="on Ctrl-C leave queued prompts on the host (the next run collects them) "
                         "instead of taking them off its queue")
    ap.add_argument("--retry-for", type=float, default=120.0,
                    help="seconds a server may not answer before its prompts go to the other servers; the run "
                         "stops when every server has not answered that long (default 120)")
    ap.add_argument("--force", action="store_true",
                    help="resume in a folder whose earlier renders used another workflow or model")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    ap.add_argument("--dry-run", action="store_true", help="list the items in queue order and exit")
    a = ap.parse_args(argv)
    urls = list(a.url or [])
    if a.urls_file is not None:
        try:
            lines = a.urls_file.read_text().splitlines()
        except OSError as e:
            ap.error(f"--urls-file: {e}")
        urls += [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]
    if not urls and a.ray is None:
        urls = [os.environ.get("COMFYUI_URL", "http://127.0.0.1:8188")]
    if a.ray is None and (a.ray_servers is not None or a.comfyui or a.comfyui_args):
        ap.error("--ray-servers, --comfyui and --comfyui-args go with --ray")
    if a.ray_servers is not None and a.ray_servers < 1:
        ap.error("--ray-servers must be at least 1")
    if a.batch_size < 1:
        ap.error("--batch-size must be at least 1")
    a.urls = list(dict.fromkeys(u.rstrip("/") for u in urls))  # one lane per server, in the order given
    a.url = a.urls[0] if a.urls else None
    return a


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
    if a.batch_size > 1 and not template.has("batch_size"):
        err(f"error: --batch-size {a.batch_size}: {template.path.name} starts its sampler from no empty latent "
            "with a batch_size (Empty Latent Image) for the tool to set; use --batch-size 1")
        return EXIT_USAGE
    batch_in_graph = template.value("batch_size")
    if isinstance(batch_in_graph, int) and batch_in_graph > 1:
        err(f"note: {template.path.name}'s latent batch_size {batch_in_graph} is set per prompt by the tool: "
            f"{a.batch_size} (--batch-size)")
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


def _first_answer(clients, retry_for: float):
    """The servers that answer now; when none does, keep knocking for ``retry_for`` seconds."""
    from .runner import LaneTrouble

    deadline = time.monotonic() + retry_for
    while True:
        up, last = [], None
        for client in clients:
            try:
                client.get("/system_stats")
                up.append(client)
            except LaneTrouble as e:
                last = e
        if up or time.monotonic() >= deadline:
            return up, last
        time.sleep(2.0)


def _resolve_model(client, template: Template, model: str | None) -> str | None:
    """The model folder the loader takes, from --model, the workflow, or the server's only one."""
    if not template.has("model"):
        return model
    loader = template.loader_class()
    available = client.loader_models(loader)
    if available is None:
        raise UsageError(f"the host at {client.url} has no {loader} node: install this pack in its custom_nodes/")
    wanted = model or template.value("model")
    if wanted in available:
        return wanted
    if model is None and len(available) == 1:
        err(f"note: using the host's only model {available[0]!r} (the workflow names {wanted!r})")
        return available[0]
    raise UsageError(f"model {wanted!r} is not on the host; it has {available or 'none'} (use --model)")


def _host_problem(client, template: Template, model: str | None) -> str | None:
    """Why this server cannot render the batch (no pack, not the model); None when it can. Warns about
    a server that caches nothing."""
    if template.has("model"):
        loader = template.loader_class()
        available = client.loader_models(loader)
        if available is None:
            return f"it has no {loader} node: install this pack in its custom_nodes/"
        if model not in available:
            return f"model {model!r} is not on it; it has {available or 'none'}"
    try:
        argv = (client.get("/system_stats").json().get("system") or {}).get("argv") or []
    except HostUnreachable:
        raise
    except Exception:  # noqa: BLE001 - only for a warning
        argv = []
    if "--cache-none" in argv:
        err(f"warning: the host {client.url} runs with --cache-none: every render encodes its subject again")
    return None


class UsageError(Exception):
    pass


def _run(a, template: Template, items) -> int:
    if a.ray is None:
        return _run_on(a, template, items, [])
    from .ray_servers import RayServers

    cluster = None
    try:
        try:
            cluster = RayServers(a.ray or None, a.ray_servers, a.comfyui, a.comfyui_args, log=err)
            actors = cluster.start()
        except RuntimeError as e:  # no ray, no GPU, or a server that cannot start (its error, e.g. no ComfyUI)
            err(f"error: {e}")
            return EXIT_USAGE
        return _run_on(a, template, items, actors)
    finally:
        if cluster is not None:
            cluster.stop()  # the actors' servers go with them, also on Ctrl-C


def _run_on(a, template: Template, items, actors) -> int:
    """``actors``: (source, first URL or None) of each Ray server actor, beside the --url servers."""
    import requests

    from .host import BatchClient
    from .runner import Lane

    try:
        manifest = Manifest(a.out).load()
    except RuntimeError as e:
        err(f"error: {e}")
        return EXIT_USAGE
    named = [(url, None) for url in a.urls] + [(url, source) for source, url in actors]
    urls = [url for url, _ in named if url]
    clients = [BatchClient(url, manifest.batch_id, retry_for=0) for url in urls]
    model = a.model
    try:
        up, last = _first_answer(clients, a.retry_for)
        if not up:
            raise HostUnreachable(f"{', '.join(urls) or 'no server'} did not answer for {a.retry_for:.0f}s: {last}")
        model = _resolve_model(up[0], template, model)
        for client in up:
            problem = _host_problem(client, template, model)
            if problem:
                raise UsageError(f"the host at {client.url} cannot render this batch: {problem}")
    except UsageError as e:
        err(f"error: {e}")
        return EXIT_USAGE
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
    manifest.header.update(batch_file=str(a.batch_file.resolve()), host=urls[0], servers=urls, template=fingerprint)
    if actors:
        manifest.header["ray"] = {"address": a.ray or "auto", "servers": len(actors)}
    answered = {client.url for client in up}
    lanes = []
    for url, source in named:
        down = url not in answered
        name = f"ray{source.index}" if source is not None else None
        if down:
            err(f"warning: {url or name} does not answer; it is used when it does")
        lanes.append(Lane(url, manifest.batch_id, down=down, source=source, name=name,
                          check=(lambda c: _host_problem(c, template, model)) if down else None))
    runner = Runner(lanes, manifest, items, template, model, a.out, ahead=a.ahead,
                    retry_failed=not a.no_retry_failed, cancel_on_stop=not a.keep_queued,
                    progress=not a.no_progress, log=err, retry_for=a.retry_for, batch_size=a.batch_size)
    where = urls[0] if len(lanes) == 1 else f"{len(lanes)} servers ({', '.join(lane.label for lane in lanes)})"
    err(f"batch {manifest.batch_id[:8]}: {len(items)} item(s) -> {a.out} on {where}")
    return runner.run()
