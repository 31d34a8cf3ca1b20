"""The ``san`` command line. ``san models`` lives here; other packages add subcommands through the
``san.cli`` entry-point group (a function ``register(subparsers)``), so this package never imports them."""

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from san import __version__
from san.registry import list_attention, list_models, list_placements, model_inputs


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad input gets one line naming the problem, and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _names(allowed: Sequence[str], what: str):
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown or text!r}; choose from: {', '.join(allowed)}")
        return names

    return parse


def human(count: float) -> str:
    """3_524_240 → '3.52M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return f"{count:.0f}"


def models_table(models: Sequence[str], attentions: Sequence[str], placements: Sequence[str], args) -> str:
    """A markdown table of each model × attention × placement: params, attention params and modules, GFLOPs."""
    from san.attention import IncompatibleConfiguration  # torch: only for the table, never for `san serve`
    from san.profile import model_stats

    rows = ["| model | attention | placement | params | attention params | modules | FLOPs |", "|---" * 7 + "|"]
    for model in models:
        for attention in attentions:
            for placement in ["-"] if attention == "none" else placements:
                try:
                    stats = model_stats(
                        model,
                        args.input_size,
                        args.num_classes,
                        attention=attention,
                        placement="bottleneck" if placement == "-" else placement,
                        **({"stem": args.stem} if args.stem and model_inputs(model) == "images" else {}),
                    )
                except IncompatibleConfiguration:  # e.g. RAN in a CNN: the combination does not exist
                    rows.append(f"| {model} | {attention} | {placement} | - | - | - | - |")
                    continue
                rows.append(
                    f"| {model} | {attention} | {placement} | {stats.params:,} | {stats.attention_params:,} "
                    f"| {stats.attention_modules} | {human(stats.flops)} |"
                )
    return "\n".join(rows)


def _models(args: argparse.Namespace) -> int:
    models = args.models or list_models()
    if not args.table:
        print("\n".join(models))
        return 0
    print(f"input {args.input_size}x{args.input_size} px (sequence models: {args.input_size} steps), "
          f"{args.num_classes} outputs, stem {args.stem or 'default'}\n")  # fmt: skip
    print(models_table(models, args.attention or list_attention(), args.placements or list_placements(), args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="san", description="Scale-Space Attention Networks: models, data, training.")
    parser.add_argument("--version", action="version", version=f"san {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)

    models = commands.add_parser("models", help="list the models, or tabulate their sizes and costs")
    models.add_argument("--table", action="store_true", help="print params, attention params, modules and FLOPs")
    models.add_argument("--input-size", type=int, default=224, help="square input size in pixels (default 224)")
    models.add_argument("--num-classes", type=int, default=1000)
    models.add_argument("--stem", choices=["imagenet", "small"], help="default: each model's own")
    models.add_argument("--models", type=_names(list_models(), "model"), help="comma-separated (default: all)")
    models.add_argument("--attention", type=_names(list_attention(), "attention"), help="comma-separated")
    models.add_argument("--placements", type=_names(list_placements(), "placement"), help="comma-separated")
    models.set_defaults(handler=_models)

    for entry in entry_points(group="san.cli"):
        entry.load()(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"san {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
