"""``san data``: build, list and inspect datasets."""

import argparse
from pathlib import Path

from pydantic import ValidationError

from training.data.catalog import CATALOG, EMBEDDED, FORMATS
from training.data.manifest import load_manifest


def _build(args: argparse.Namespace) -> int:
    from training.data.build import build_dataset  # imports ffcv: only when building
    from training.data.series import SeriesOptions
    from training.data.writer import WriterOptions

    given = {key: value for key, value in vars(args).items() if value is not None}
    if "target" in given:
        given["target"] = tuple(name.strip() for name in given["target"].split(","))
    try:
        options = WriterOptions(**{key: value for key, value in given.items() if key in WriterOptions.model_fields})
        series = SeriesOptions(**{key: value for key, value in given.items() if key in SeriesOptions.model_fields})
    except ValidationError as error:
        first = error.errors()[0]
        raise ValueError(f"--{first['loc'][0].replace('_', '-')}: {first['msg']}") from None
    build_dataset(args.format, args.source, args.out, options, args.strict, args.roi_crop, series)
    return 0


def _list(_: argparse.Namespace) -> int:
    print("| dataset | writer | classes | px | train | val | mean (0–255) | std | description |")
    print("|---|---|---:|---:|---:|---:|---|---|---|")
    for info in CATALOG.values():
        mean, std = (", ".join(f"{v:.1f}" for v in stats[: info.channels]) for stats in (info.mean, info.std))
        size, outputs = info.resolution, info.num_classes
        if info.kind == "series":  # steps × features; a forecast predicts `horizon` steps, not classes
            size, mean, std = f"{info.resolution} steps × {info.channels}", "measured", "measured"
            outputs = f"{info.horizon} steps ahead" if info.task == "forecast" else outputs
        print(
            f"| {info.name} | {info.format} | {outputs} | {size} | {info.train_count:,} "
            f"| {info.val_count:,} | {mean} | {std} | {info.description} |"
        )
    return 0


def _info(args: argparse.Namespace) -> int:
    from ffcv.reader import Reader  # only `info` needs to open the file

    manifest = load_manifest(args.file)
    try:
        reader = Reader(str(args.file))
        stored = len(reader.metadata)
    except Exception as error:
        raise ValueError(f"{args.file}: cannot be read as an FFCV dataset ({error})") from error
    print(manifest.model_dump_json(indent=2, exclude={"classes"}))
    outputs = "outputs" if manifest.task == "forecast" else "classes"
    print(f"{outputs}: {manifest.num_classes}; read back: {stored:,} records", end="")
    if stored != manifest.count:
        raise ValueError(f"{args.file}: holds {stored} records but its manifest says {manifest.count}")
    print(" (matches the manifest)")
    return 0


def register(commands) -> None:
    """Add ``san data`` to the ``san`` command line (entry point ``san.cli``)."""
    data = commands.add_parser("data", help="build, list and inspect FFCV datasets")
    sub = data.add_subparsers(dest="data_command", required=True, parser_class=type(data))

    build = sub.add_parser("build", help="write train.beton and val.beton from a dataset's distribution files")
    build.add_argument("format", choices=[*FORMATS, *EMBEDDED], help="the source format, or an embedded dataset")
    build.add_argument("source", nargs="?", type=Path, help="the dataset's directory (embedded sets need none)")
    build.add_argument("--out", type=Path, required=True, help="directory for the .beton and .json files")
    build.add_argument("--write-mode", choices=["raw", "jpg", "smart", "proportion"])
    build.add_argument("--max-resolution", type=int)
    build.add_argument("--jpeg-quality", type=int)
    build.add_argument("--compress-probability", type=float)
    build.add_argument("--num-workers", type=int)
    build.add_argument("--subset", type=int, help="keep this many images per split, spread evenly")
    build.add_argument("--strict", action="store_true", help="fail on unreadable images instead of skipping them")
    build.add_argument("--roi-crop", action="store_true", help="GTSRB: crop each sign to its ROI box")
    build.add_argument("--length", type=int, help="ts: pad every case to this many steps (default: the longest)")
    build.add_argument("--window", type=int, help="forecast-csv: input steps per window")
    build.add_argument("--horizon", type=int, help="forecast-csv: steps predicted after each window")
    build.add_argument("--val-steps", type=int, help="forecast-csv: the series' last steps, held out for validation")
    build.add_argument("--target", help="forecast-csv: the predicted column(s), comma-separated (default: the last)")
    build.set_defaults(handler=_build)

    sub.add_parser("list", help="the dataset catalog").set_defaults(handler=_list)

    info = sub.add_parser("info", help="a .beton's manifest, checked against the file")
    info.add_argument("file", type=Path)
    info.set_defaults(handler=_info)
