"""``petserve build-cache``: build a CapS cache adapter (adapters/caps.py) from a folder of images.

    petserve build-cache --classes FILE --support DIR --captioner ADAPTER_ID --out FILE
                         [--val DIR] [--val-per-class 1] [--views 10] [--template "a {}" ...]
                         [--store DIR] [--backbone DIR] [--clip PATH] [--seed 0]

``--classes``: one label a line (blank lines and ``#`` lines skipped). ``--support`` (and
``--val``): one sub-folder per class named as its label, holding its images; hidden entries and
loose files are ignored. The support images are captioned by adapter ``--captioner`` of the store,
through the serving engine (the same batched generation the server answers with), then
adapters/caps_build.py builds the head and searches its weights. Without ``--backbone`` the
embedded demo backbone and its CLIP text side are used, and the store is seeded with the demo
adapters as ``petserve serve`` does. Prints one JSON line; errors are one line, exit 2, nothing
written.
"""
from __future__ import annotations

import json
from pathlib import Path

from petserve.serving.cli import CliError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def register(sub) -> None:
    p = sub.add_parser("build-cache", help="build a CapS cache adapter from labelled images",
                       description="Caption the support images with a captioner adapter (through "
                                   "the serving engine) and build a CapS cache classifier file.")
    p.add_argument("--classes", type=Path, required=True, help="file of class labels, one a line")
    p.add_argument("--support", type=Path, required=True, help="directory: one folder of images "
                   "per class, named as its label")
    p.add_argument("--captioner", required=True, help="id of a caption adapter in the store")
    p.add_argument("--out", type=Path, required=True, help="cache file to write (.safetensors)")
    p.add_argument("--val", type=Path, help="validation images, laid out as --support (default: "
                   "hold --val-per-class support images of each class out)")
    p.add_argument("--val-per-class", type=int, default=1, help="support images of each class "
                   "held out for the weight search when there is no --val (default 1)")
    p.add_argument("--views", type=int, default=10, help="augmented views averaged per support "
                   "image (default 10)")
    p.add_argument("--template", action="append", dest="templates", metavar="TEMPLATE",
                   help="class prompt template with one {} (repeat for an ensemble; default 'a {}')")
    p.add_argument("--store", type=Path, help="adapter store directory (default: the one "
                   "`petserve serve` uses, $PETSERVE_STORE (a directory or an s3:// URL) or "
                   "~/.cache/petserve/store)")
    p.add_argument("--backbone", type=Path, help="backbone directory (default: the embedded demo)")
    p.add_argument("--clip", type=Path, help="CLIP's text side: a text tower file or a CLIPModel "
                   "save_pretrained directory (needed with --backbone)")
    p.add_argument("--seed", type=int, default=0, help="augmented views (default 0)")
    p.set_defaults(run=run)


def read_labels(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CliError(f"--classes {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"--classes {path}: cannot read ({e})") from None
    labels = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    if not labels:
        raise CliError(f"--classes {path} has no classes")
    seen = set()
    for label in labels:
        if label in seen:
            raise CliError(f"--classes {path}: class {label!r} is listed twice")
        seen.add(label)
    return labels


def read_split(directory: Path, labels: list[str], flag: str):
    """Split of the images in ``directory/<label>/`` (sorted by name), decoded as the server
    decodes uploaded images (serving/media.py)."""
    from petserve.adapters.caps_build import Split
    from petserve.serving.errors import ApiError
    from petserve.serving.media import decode_image
    from petserve.serving.server_config import MediaSettings
    if not directory.is_dir():
        raise CliError(f"{flag} {directory}: no such directory")
    folders = {p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")}
    strays = sorted(folders - set(labels))
    if strays:
        raise CliError(f"{flag} {directory}: folder {strays[0]!r} is not a class of --classes")
    limits, images, targets = MediaSettings().limits(), [], []
    for c, label in enumerate(labels):
        if label not in folders:
            raise CliError(f"{flag} {directory}: class {label!r} has no folder")
        files = sorted(p for p in (directory / label).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CliError(f"{flag} {directory}: class {label!r} has no images "
                           f"({', '.join(IMAGE_SUFFIXES)})")
        for path in files:
            try:
                images.append(decode_image(path.read_bytes(), limits, field=str(path)))
            except ApiError as e:
                raise CliError(e.message) from None
            targets.append(c)
    return Split(images, targets)


def check_options(args) -> list[str]:
    """The templates; CliError on a non-positive count, a template that is not 'text {} text',
    --backbone without --clip or an --out that is a directory."""
    from petserve.adapters.caps_build import DEFAULT_TEMPLATES
    for flag in ("views", "val_per_class"):
        if getattr(args, flag) < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be at least 1")
    templates = args.templates or list(DEFAULT_TEMPLATES)
    for t in templates:
        try:
            ok = t.count("{}") == 1 and bool(t.format("x"))
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CliError(f"--template {t!r}: a template holds one {{}} (the label) and no "
                           "other braces")
    if args.backbone is not None and args.clip is None:
        raise CliError("--backbone needs --clip (CLIP's text side for that backbone)")
    if args.out.is_dir():
        raise CliError(f"--out {args.out} is a directory")
    return templates


def check_held_out(split, labels: list[str], per_class: int) -> None:
    """Without --val each class must keep a support image after ``per_class`` are held out."""
    for c, label in enumerate(labels):
        n = split.targets.count(c)
        if n <= per_class:
            raise CliError(f"--support: class {label!r} has {n} image(s); --val-per-class "
                           f"{per_class} holds that many out and at least one must stay (add "
                           "images or give --val)")


def open_store(args, assets):
    """The store (seeded with the demo adapters when the backbone is the embedded default) and
    the captioner id checked to be in it."""
    from petserve.serving.errors import ApiError
    from petserve.serving.server_config import ServerConfig
    from petserve.serving.store import open_store as open_adapter_store
    from petserve.serving.store import validate_adapter_id
    config = ServerConfig() if args.store is None else ServerConfig(store_dir=args.store,
                                                                    store_url=None)
    where = config.store_url or config.store_dir
    try:
        captioner = validate_adapter_id(args.captioner)
        store = open_adapter_store(config)
        if assets is not None:
            from petserve.serving.deployments import seed_store
            seed_store(store, assets.adapters, str(assets.backbone_dir), config.max_adapter_bytes)
    except ApiError as e:
        raise CliError(f"--captioner: {e.message}" if e.code == "invalid_adapter_id"
                       else f"--store {where}: {e.message}") from None
    except OSError as e:
        raise CliError(f"--store {where}: {e}") from None
    try:
        store.get(captioner)
    except ApiError:
        raise CliError(f"no adapter {captioner!r} in store {where}") from None
    return store, captioner


def load_model(args, assets):
    """(model, towers): --backbone and --clip, or the embedded demo's."""
    from petserve.adapters.backbone import build_backbone
    from petserve.adapters.clip_towers import TowersError, load_clip
    backbone = args.backbone if assets is None else assets.backbone_dir
    try:
        model = build_backbone(backbone)
    except (OSError, ValueError, KeyError) as e:
        raise CliError(f"--backbone {backbone}: cannot load ({e})") from None
    if model.vision is None:
        raise CliError(f"--backbone {backbone}: a cache classifier needs a vision encoder")
    clip = args.clip if args.clip is not None else assets.clip_text
    try:
        return model, load_clip(clip, model)
    except TowersError as e:
        raise CliError(f"--clip: {e}") from None
    except (OSError, KeyError, ValueError) as e:
        raise CliError(f"--clip {clip}: cannot load ({e})") from None


def engine_captioner(engine, adapter_id: str):
    """images -> captions, every image queued at once so the engine batches them."""
    from petserve.serving.engine_io import InferenceRequest
    from petserve.serving.errors import ApiError

    def caption(images: list) -> list[str]:
        try:
            futures = [engine.submit(InferenceRequest(adapter=adapter_id, task="caption", text="",
                                                      images=[im])) for im in images]
            return [f.result().text for f in futures]
        except ApiError as e:
            raise CliError(f"--captioner {adapter_id}: {e.message}") from None
    return caption


def run(args, extra) -> int:
    import torch

    from petserve.adapters.atomic_file import write_atomically
    from petserve.adapters.cache_file import cache_bytes, towers_identity
    from petserve.adapters.caps_build import build_cache
    from petserve.serving.engine import Engine
    from petserve.serving.server_config import EngineConfig
    templates = check_options(args)
    labels = read_labels(args.classes)
    support = read_split(args.support, labels, "--support")
    val = read_split(args.val, labels, "--val") if args.val is not None else None
    if val is None:
        check_held_out(support, labels, args.val_per_class)
    assets = None
    if args.backbone is None:
        from petserve.adapters.demo import ensure_demo_assets
        assets = ensure_demo_assets()
    store, captioner = open_store(args, assets)
    model, towers = load_model(args, assets)
    # the whole support set is queued at once: let the queue hold it
    config = EngineConfig(max_queue=max(EngineConfig().max_queue, len(support.images)))
    engine = Engine(model, store, config)
    engine.start()
    try:
        with torch.inference_mode():
            built = build_cache(model, towers, labels, support, engine_captioner(engine, captioner),
                                val=val, val_per_class=args.val_per_class, views=args.views,
                                templates=templates, seed=args.seed)
    finally:
        engine.stop()
    data = cache_bytes(built.head, towers_identity(towers), name=args.out.stem)
    write_atomically(args.out, lambda f: f.write(data))
    h = built.head
    print(json.dumps({"out": str(args.out), "classes": len(labels),
                      "supports": len(support.images), "validation": built.validation,
                      "weights": {"alpha": h.alpha, "beta": h.beta, "gamma": h.gamma,
                                  "delta": h.delta}}))
    return 0
