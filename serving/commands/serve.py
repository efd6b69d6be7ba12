"""``petserve serve``: run the HTTP API on Ray Serve (or, with --no-ray, in this process).

Ray: connects to a running cluster when one is reachable (``RAY_ADDRESS``, or the latest cluster
started with ``ray start`` on this machine), else starts a local one with the machine's CPUs/GPUs.
Blocks until Ctrl-C, then removes the app (and stops Ray if it started it).

Memory: only the Backbone replicas import torch. Preparing the server (checking the backbone,
seeding the store with the demo adapters: both need torch) runs in a child process that exits,
not in this driver, which lives as long as the server. A local Ray starts without its dashboard
(our /metrics comes from the MetricsBoard deployment, not from Ray); for Ray's dashboard, start
a cluster with ``ray start --head`` and this command connects to it.
"""
from __future__ import annotations

import multiprocessing
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pydantic import ValidationError

from petserve.serving.cli import CliError

APP_NAME = "petserve"


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve adapters over HTTP (Ray Serve)",
                       description="Serve the HTTP API. With no arguments: the embedded default "
                                   "(tiny backbone + demo adapters) on CPU.")
    p.add_argument("--config", type=Path, help="YAML file of ServerConfig fields (flags override)")
    p.add_argument("--backbone", help="backbone preset (tiny, t5-base, ...) or directory")
    p.add_argument("--store", help="adapter store: a directory, or s3://BUCKET[/PREFIX] shared by "
                   "replicas on many nodes (default $PETSERVE_STORE, either form, else "
                   "~/.cache/petserve/store; S3 endpoint and credentials from the AWS environment: "
                   "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...; each replica caches S3 blobs in "
                   "~/.cache/petserve/store)")
    p.add_argument("--adapters", type=Path, help="directory of .safetensors adapters to put into the "
                                                 "store at start (id: the file name), e.g. "
                                                 "import-seed's DIR/adapters")
    p.add_argument("--clip", type=Path, help="CLIP's text side for /v1/classify and cache "
                   "adapters: a text tower file or a CLIPModel save_pretrained directory (the "
                   "embedded default ships one)")
    p.add_argument("--audio-backbone", help="the audio family's AST for /v1/audio/classify: a "
                   "Hugging Face AST directory or a preset (tiny-ast, ast-base); the embedded "
                   "default ships one")
    p.add_argument("--generator", type=Path, help="Generative Adapter generator for the backbone "
                   "(petserve train-generator; the embedded default ships one): enables "
                   "POST /v1/adapters/{id}/generate and inline `context` requests")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, help="backbone replicas (one per GPU when GPUs exist)")
    p.add_argument("--num-slots", type=int, help="adapter slots per replica")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the backbone runs")
    p.add_argument("--no-ray", action="store_true",
                   help="serve from this process with uvicorn (one replica, no Ray)")
    p.set_defaults(run=run)


def server_config(args):
    """ServerConfig from --config plus the flags given (validated: errors are CliErrors)."""
    from petserve.serving.server_config import ServerConfig
    try:
        data = {}
        if args.config is not None:
            data = ServerConfig.from_yaml(args.config).model_dump(exclude_unset=True)
        flags = {"backbone": args.backbone, "adapters_dir": args.adapters,
                 "generator": args.generator, "clip": args.clip, "host": args.host,
                 "audio_backbone": args.audio_backbone,
                 "port": args.port, "replicas": args.replicas, "device": args.device}
        data.update({k: v for k, v in flags.items() if v is not None})
        data.update(store_flags(args.store))
        if args.num_slots is not None:
            data["engine"] = {**data.get("engine", {}), "num_slots": args.num_slots}
        return ServerConfig.model_validate(data)
    except FileNotFoundError as e:
        raise CliError(f"--config: {e.filename}: no such file") from None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'config'}: {x['msg']}"
                             for x in e.errors())
        raise CliError(f"invalid server configuration: {problems}") from None


def store_flags(store: str | None) -> dict:
    """--store as ServerConfig fields: an s3:// URL is store_url, anything else store_dir (and no
    S3 store, whatever $PETSERVE_STORE says)."""
    if store is None:
        return {}
    if store.startswith("s3://"):
        return {"store_url": store}
    return {"store_dir": Path(store), "store_url": None}


def check_backbone(spec: str | None) -> None:
    """Fail fast (before Ray starts) on a backbone that is neither a preset nor a directory."""
    from petserve.adapters.backbone.config import PRESETS
    if spec is None or Path(spec).is_dir() or spec.split("+")[0] in PRESETS:
        return
    raise CliError(f"--backbone {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                   "directory")


def check_audio_backbone(spec: str | None) -> None:
    """Fail fast (before Ray starts) on an audio backbone that does not load."""
    if spec is None:
        return
    from petserve.adapters.backbone.audio import build_audio_backbone
    try:
        build_audio_backbone(spec)
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise CliError(f"--audio-backbone: {str(e).strip(chr(39))}") from None


def run(args, extra) -> int:
    started = time.monotonic()
    config = server_config(args)
    if args.no_ray:
        return _serve_in_process(prepare(config), started)
    # A fresh interpreter (spawn, not fork): what preparing imports dies with it.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        prepared = child.submit(prepare, config).result()
    return _serve_on_ray(prepared, started)


def prepare(config):
    """`check_backbone`, then serving.deployments.prepare_server; its errors as CliErrors."""
    from petserve.serving.deployments import prepare_server
    from petserve.serving.errors import ApiError
    check_backbone(config.backbone)
    check_audio_backbone(config.audio_backbone)
    try:
        return prepare_server(config)
    except (FileNotFoundError, ValueError) as e:     # e.g. --backbone names nothing
        raise CliError(str(e)) from None
    except ApiError as e:                            # e.g. the store's bucket is missing
        raise CliError(f"--store: {e.message}") from None
    except ImportError as e:                         # an s3:// store without boto3
        raise CliError(f"--store {config.store_url}: {e} (pip install boto3)") from None


def _banner(prepared, started: float, where: str) -> None:
    cfg = prepared.config
    url, store = f"http://{cfg.host}:{cfg.port}", cfg.store_url or cfg.store_dir
    print(f"petserve: serving {url} ({where}; backbone {cfg.backbone}; store {store}) "
          f"ready in {time.monotonic() - started:.1f} s", flush=True)
    print(f"petserve: API docs at {url}/docs", flush=True)
    for note in prepared.notes:
        print(f"petserve: note: {note}", flush=True)
    if prepared.demo_adapters:
        print(f"petserve: demo adapters: {', '.join(prepared.demo_adapters)}", flush=True)
    if prepared.token_generated:
        print(f"petserve: write token (set {cfg.token_env} to choose one): {prepared.token}",
              flush=True)


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt


def _serve_on_ray(prepared, started: float) -> int:
    import ray
    from ray import serve

    from petserve.serving.deployments import build_app
    cfg = prepared.config
    # An existing cluster if reachable (include_dashboard then changes nothing); a local one
    # without the dashboard's ~1 GB of head-module processes.
    context = ray.init(logging_level="WARNING", include_dashboard=False)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)  # containers stop us with SIGTERM
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg, prepared.token), name=APP_NAME, route_prefix="/")
    _banner(prepared, started, f"Ray Serve at {context.address_info.get('address', 'local')}, "
                               f"{cfg.replicas} backbone replica(s)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("petserve: stopping", flush=True)
    finally:
        serve.delete(APP_NAME)
        ray.shutdown()
    return 0


def _serve_in_process(prepared, started: float) -> int:
    import uvicorn

    from petserve.serving.api import create_app
    from petserve.serving.auth import TokenCheck
    from petserve.serving.deployments import LocalBackend
    cfg = prepared.config
    backend = LocalBackend.from_config(cfg)
    backend.start()
    app = create_app(backend, cfg, TokenCheck.for_token(prepared.token))
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning"))
    _banner(prepared, started, "in-process, no Ray")
    try:
        server.run()
    finally:
        backend.stop()
    return 0
