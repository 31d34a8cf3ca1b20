"""``san train``: run a JobSpec on a local Ray (or the cluster in ``RAY_ADDRESS``)."""

import argparse


def _train(args: argparse.Namespace) -> int:
    from training.run import run  # imports Ray and MLflow: only when training

    return run(args.spec, args.job_id, args.workers, args.epochs)


def register(commands) -> None:
    """Add ``san train`` to the ``san`` command line (entry point ``san.cli``)."""
    train = commands.add_parser("train", help="train a JobSpec (YAML/JSON) on Ray, tracked in MLflow")
    train.add_argument("spec", help="e.g. configs/lenet5-fmnist.yaml")
    train.add_argument("--workers", type=int, help="override scaling.num_workers")
    train.add_argument("--epochs", type=int, help="override training.epochs")
    train.add_argument("--job-id", help="names the Ray run and tags the MLflow run (default: generated)")
    train.set_defaults(handler=_train)
