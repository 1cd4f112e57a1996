"""The `vlltr` command line. Each subcommand imports its room lazily, so `vlltr serve` never imports torch.

A user's mistake (bad data, a bad config, a missing file or directory, an unknown architecture, a run that
cannot be exported, a bad bundle: the domain errors of `vlltr.errors`) ends the command with one line,
`vlltr <command>: <message>`, on stderr and exit status 2; `-v` shows the traceback as well. Anything else is
a fault of the program and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from vlltr.errors import VlltrError

DEFAULT_URL = "http://127.0.0.1:8000"

# What a user can fix: the domain errors, and the operating system saying a path given is not usable.
USER_ERRORS: tuple[type[BaseException], ...] = (
    VlltrError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
USER_ERROR_STATUS = 2
VERBOSE_HELP = "debug logging, and the traceback of an error"


def _add_data(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("data", help="write a bundled long-tailed benchmark to disk")
    which = p.add_subparsers(dest="dataset", required=True)
    d = which.add_parser("digits-lt", help="scikit-learn's handwritten digits, made long-tailed, with class text")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--seed", type=int, default=0, help="seed for the split and the class order")
    s = which.add_parser("shapes-lt", help="procedural shapes, CIFAR-100-LT profile, noisy class text")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--seed", type=int, default=0, help="seed for everything drawn")
    s.add_argument("--imbalance", type=float, default=100.0, help="n_max / n_min of the training profile")
    # The styles of training.benchmarks.shapes_text.class_names, spelled out here so `vlltr serve` imports nothing.
    s.add_argument(
        "--names",
        choices=("attributes", "epithet"),
        default="attributes",
        help="class names: attributes ('striped red triangle') or epithet ('velmor triangle': the "
        "colour and pattern only in the descriptions)",
    )
    s.add_argument(
        "--monochrome-sessions",
        type=float,
        default=0.0,
        metavar="P",
        help="chance that a training session (25 images) is black and white (default 0: all in colour). "
        "A few-shot class is one session, so its colour may be known only from its text",
    )


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", help="stage 1, AnSS, stage 2, evaluation and calibration")
    p.add_argument("--config", required=True, help="YAML file, or the name of a bundled config")
    p.add_argument("--out", required=True, help="run directory (resumed if it holds an unfinished run)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set run.seed=1 --set data.root=DIR (repeatable)",
    )


def _add_pretrain(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "pretrain",
        help="build the pretrained stand-in CLIP a bundled benchmark's runs start from",
        description="Contrastive pretraining of a tiny CLIP on a separate, balanced, captioned image set drawn "
        "for the benchmark (never its images, class names or class text), written as a state dict for "
        "`vlltr train --set model.arch=ARCH --set model.pretrained=FILE`.",
    )
    p.add_argument("--out", required=True, help="checkpoint file to write (a .json with the recipe goes beside it)")
    p.add_argument(
        "--benchmark",
        default=None,
        metavar="DIR",
        help="a benchmark written by `vlltr data`: picks its recipe (and keeps Digits-LT's images out)",
    )
    # The names of training.pretrain.PRETRAIN_RECIPES, spelled out here so `vlltr serve` imports nothing.
    p.add_argument("--recipe", choices=("shapes-lt", "digits-lt"), default=None, help="the recipe, by benchmark")
    p.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: the recipe's)")
    p.add_argument("--num-images", type=int, default=None, help="shapes: images drawn (default: the recipe's)")
    p.add_argument("--seed", type=int, default=None, help="seed of the build (default: the recipe's)")


def _add_eval(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("eval", help="metrics JSON and per-class plot for a trained run")
    p.add_argument("--checkpoint", required=True, help="run directory written by `vlltr train`")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--out", default=None, help="where to write metrics and plot (default: RUN/eval-<split>)")


def _add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export", help="write and verify a model bundle for the service")
    p.add_argument("--checkpoint", required=True, help="run directory written by `vlltr train`")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--fp16", action="store_true", help="fp16 encoders, only if they agree with fp32 on the eval set")


def _add_classes(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "classes",
        help="list, add and delete classes of a running service; export and import added classes",
        description="`list`, `add` and `delete` work against a running service (--url). `export` and `import` "
        "move added classes as JSON lines (one class per line: name, descriptions, when and by whom), "
        "against a running service or a class store directly. The file holds descriptions, not features, so "
        "it imports into a deployment on any bundle.",
    )
    which = p.add_subparsers(dest="action", required=True)
    listing = which.add_parser("list", help="the served classes of a running service")
    add = which.add_parser("add", help="add a class from its descriptions to a running service")
    add.add_argument("name", help="the class name")
    add.add_argument(
        "descriptions", nargs="*", metavar="DESCRIPTION", help="sentences describing the class (or --file)"
    )
    add.add_argument("--file", type=Path, default=None, help="a text file of descriptions, one per line")
    delete = which.add_parser("delete", help="delete a class added at run time from a running service")
    delete.add_argument("name", help="the class name")
    for a in (listing, add, delete):
        _add_service_target(a)
    for action, what in (("export", "write every added class to FILE"), ("import", "add the classes of FILE")):
        a = which.add_parser(action, help=what)
        a.add_argument("file", metavar="FILE", help="the JSON-lines file ('-' for standard output/input)")
        target = a.add_mutually_exclusive_group(required=True)
        target.add_argument("--url", help="a running service, e.g. http://localhost:8000")
        target.add_argument("--redis-url", help="a Redis class store, e.g. redis://localhost:6379/0")
        target.add_argument("--class-store", type=Path, help="a class-store file (the embedded default store)")
        a.add_argument(
            "--token",
            default=None,
            help="the service's admin token (default: $VLLTR_ADMIN_TOKEN); only with --url",
        )
        a.add_argument(
            "--redis-prefix",
            default=os.environ.get("VLLTR_REDIS_PREFIX", "vlltr"),
            help="the deployment's Redis key prefix, its namespace (default: $VLLTR_REDIS_PREFIX or vlltr)",
        )


def _add_service_target(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=os.environ.get("VLLTR_URL", DEFAULT_URL),
        help=f"the service (default: $VLLTR_URL, else {DEFAULT_URL})",
    )
    p.add_argument("--token", default=None, help="the service's admin token (default: $VLLTR_ADMIN_TOKEN)")


def _add_classify(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("classify", help="classify images with a running service")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--top-k", type=int, default=3, help="classes per image (default: 3)")
    p.add_argument("--explain", action="store_true", help="show the branch probabilities and the matching sentences")
    p.add_argument("--json", action="store_true", help="print the API's answers as JSON lines")
    _add_service_target(p)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vlltr` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        # The service owns its flags (derived from its settings model); hand over the rest of the line.
        from vlltr.service.cli import main as serve_main

        return serve_main(argv[1:])

    parser = argparse.ArgumentParser(prog="vlltr", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)
    _add_pretrain(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_classes(sub)
    _add_classify(sub)
    sub.add_parser("serve", help="the HTTP service (see `vlltr serve --help`)")
    sub.add_parser("models", help="list the architectures usable in `model.arch`")
    _verbose_everywhere(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return _dispatch(args)
    except USER_ERRORS as exc:
        return report_user_error(_command_name(args), exc, verbose=args.verbose)


def _verbose_everywhere(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # `-v` after the subcommand too (`vlltr train ... -v`, `vlltr data shapes-lt ... -v`); SUPPRESS keeps a
    # `-v` given before it.
    for command in sub.choices.values():
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _verbose_everywhere(action)


def _command_name(args: argparse.Namespace) -> str:
    if args.command == "data":
        return f"{args.command} {args.dataset}"
    if args.command == "classes":
        return f"classes {args.action}"
    return str(args.command)


def report_user_error(command: str, exc: BaseException, *, verbose: bool) -> int:
    """Print `vlltr <command>: <message>` (after the traceback when `verbose`) to stderr; the exit status."""
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"vlltr {command}: {message}", file=sys.stderr)
    return USER_ERROR_STATUS


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "data":
        from vlltr.training.benchmarks import write_benchmark

        extra = {"monochrome_prob": args.monochrome_sessions} if args.dataset == "shapes-lt" else {}
        write_benchmark(
            args.dataset,
            args.out,
            seed=args.seed,
            imbalance=getattr(args, "imbalance", None),
            names=getattr(args, "names", None),
            **extra,
        )
    elif args.command == "pretrain":
        from vlltr.training.pretrain import pretrain_to_file

        path, recipe = pretrain_to_file(
            args.out,
            benchmark_dir=args.benchmark,
            recipe=args.recipe,
            epochs=args.epochs,
            num_images=args.num_images,
            seed=args.seed,
        )
        print(f"wrote {path}; train from it with --set model.arch={recipe.arch} --set model.pretrained={path}")
    elif args.command == "train":
        from vlltr.training.config import load_config
        from vlltr.training.pipeline import run_training

        run_training(load_config(args.config, args.overrides), args.out)
    elif args.command == "eval":
        from vlltr.training.evaluate import evaluate_checkpoint

        evaluate_checkpoint(args.checkpoint, split=args.split, out_dir=args.out)
    elif args.command == "export":
        from vlltr.training.export import export_bundle

        export_bundle(args.checkpoint, args.out, fp16=args.fp16)
    elif args.command == "classify":
        from vlltr.client.cli import classify_command

        return classify_command(args.images, url=args.url, top_k=args.top_k, explain=args.explain, as_json=args.json)
    elif args.command == "classes" and args.action in ("list", "add", "delete"):
        from vlltr.client.cli import classes_command

        return classes_command(args)
    elif args.command == "classes":
        return _classes(args)
    elif args.command == "models":
        from vlltr.model.networks.factory import list_architectures, project_architectures

        print("\n".join(list_architectures()))
        print(f"# project tiny configs: {', '.join(project_architectures())}", file=sys.stderr)
    return 0


def _classes(args: argparse.Namespace) -> int:
    from vlltr.service import class_admin

    token = args.token if args.token is not None else os.environ.get("VLLTR_ADMIN_TOKEN") or None
    target = class_admin.open_target(
        url=args.url,
        token=token,
        redis_url=args.redis_url,
        redis_prefix=args.redis_prefix,
        class_store=args.class_store,
        must_exist=args.action == "export",
    )
    try:
        if args.action == "export":
            lines = target.export_lines()
            class_admin.write_export(lines, args.file)
            print(f"exported {class_admin.count_classes(lines)} classes to {args.file}", file=sys.stderr)
            return 0
        summary = target.import_lines(class_admin.read_import(args.file))
    finally:
        target.close()
    for problem in summary.problems:
        print(f"vlltr classes import: {problem}", file=sys.stderr)
    print(summary.line(), file=sys.stderr)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
