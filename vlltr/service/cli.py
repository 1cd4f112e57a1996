"""`vlltr serve`: flags derived from `vlltr.service.settings.Settings`, then uvicorn in this process (`--workers 1`)
or the multi-process service (`vlltr.service.workers`: N HTTP front-ends and one engine).

Every settings field is a flag (`max_wait_ms` -> `--max-wait-ms`) whose help line is the field's
description plus its environment variable and default. A flag wins over the environment, which wins over
the default. Never imports torch: the demo bundle is built by a subprocess (`vlltr.service.demo`).

What stops the service before it serves (an invalid flag or variable, a bad bundle, `--provider cuda` without
CUDA, no demo bundle and no way to build one) is one line on stderr and exit status 2, as for the other
`vlltr` commands; `--log-level debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
import traceback
import types
import typing
from typing import Any, Literal

from pydantic import SecretStr, ValidationError

from vlltr.errors import BundleError, DemoBundleError, ProviderError
from vlltr.service.settings import Settings, env_name

log = logging.getLogger(__name__)

START_ERROR_STATUS = 2  # as `vlltr` gives for every user's mistake (vlltr.cli)

DESCRIPTION = """\
Serve a VL-LTR model bundle over HTTP (ONNX Runtime, dynamic micro-batching, classes added by text).

With no --bundle (and no VLLTR_BUNDLE) the demo bundle is served: it is built under the cache dir on
first use (needs the training extra), then reused. Every flag can also be set by the environment
variable shown with it; flags take precedence.
"""


def flag_name(field_name: str) -> str:
    """The command-line flag of a settings field."""
    return "--" + field_name.replace("_", "-")


def _shown_default(name: str) -> str:
    field = Settings.model_fields[name]
    if field.default_factory is not None:
        return "computed" if name != "cache_dir" else "$XDG_CACHE_HOME/vlltr or ~/.cache/vlltr"
    default = field.default
    if default is None:
        return "unset"
    if isinstance(default, SecretStr):
        return "set"
    return str(default)


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def _metavar(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(annotation) in (typing.Union, types.UnionType) and args else annotation
    return {int: "N", float: "X", str: "TEXT", SecretStr: "TOKEN"}.get(base, "PATH")


def build_parser() -> argparse.ArgumentParser:
    """The `vlltr serve` parser: one flag per settings field."""
    parser = argparse.ArgumentParser(
        prog="vlltr serve", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, field in Settings.model_fields.items():
        help_line = f"{field.description} [env {env_name(name)}; default: {_shown_default(name)}]"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_line}
        if _is_bool(field.annotation):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif (choices := _choices(field.annotation)) is not None:
            kwargs["choices"] = choices
        else:
            kwargs["metavar"] = _metavar(field.annotation)
        parser.add_argument(flag_name(name), **kwargs)
    return parser


def settings_from_args(argv: list[str]) -> Settings:
    """Parse flags and build the settings (flags over environment over defaults).

    Raises:
        SystemExit: `--help`, or an invalid flag or environment value (status 2, message names it).
    """
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        return Settings(**args)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err.get("loc") else "?"
            source = flag_name(field) if field in args else env_name(field)
            problems.append(f"{source}: {err['msg']}")
        parser.error("; ".join(problems))
        raise  # unreachable: parser.error exits


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (or `localhost`): only this machine can connect."""
    if host.strip("[]").lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def open_class_changes_refusal(settings: Settings) -> str | None:
    """Why `vlltr serve` refuses to start with class changes open to the network, or None.

    Listening on a non-loopback address without an admin token lets anyone who can reach the port add and delete
    classes; that needs the explicit opt-out `allow_open_class_changes` (then it starts and warns)."""
    if settings.admin_token is not None or is_loopback(settings.host):
        return None
    if settings.allow_open_class_changes:
        log.warning(
            "class changes are open: listening on %s without an admin token (%s), so anyone who can reach "
            "the port can add, delete, import and export classes; set %s to require a token",
            settings.host,
            env_name("allow_open_class_changes"),
            env_name("admin_token"),
        )
        return None
    return (
        f"refusing to listen on {settings.host} without an admin token: anyone who could reach the port could add "
        f"and delete classes. Set {env_name('admin_token')} (clients then send 'Authorization: Bearer <token>'), "
        f"or start with {flag_name('allow_open_class_changes')} ({env_name('allow_open_class_changes')}=1) to "
        "allow open class changes on purpose"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `vlltr serve`."""
    settings = settings_from_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    refusal = open_class_changes_refusal(settings)
    if refusal is not None:
        print(f"vlltr serve: {refusal}", file=sys.stderr)
        return START_ERROR_STATUS
    if settings.bundle is None:
        from vlltr.service.demo import ensure_demo_bundle

        try:
            settings.bundle = ensure_demo_bundle(settings.cache_dir)
        except DemoBundleError as exc:
            return _refuse(str(exc), exc, settings)
        log.info("serving the demo bundle from %s", settings.bundle)

    if settings.worker_count > 1:
        from vlltr.service.workers import serve_workers

        return serve_workers(settings)

    import uvicorn

    from vlltr.service.app import create_app
    from vlltr.service.core import ServingCore
    from vlltr.service.metrics import Metrics

    # Loaded before the server starts so that a bad bundle or an unusable provider ends the command with
    # one clear line (and a non-zero status) instead of a server that never becomes ready.
    try:
        core = ServingCore.load(settings, Metrics(redis_enabled=bool(settings.redis_url)))
    except (BundleError, ProviderError) as exc:
        return _refuse(f"cannot serve {settings.bundle}: {exc}", exc, settings)
    from vlltr.service.connections import uvicorn_options

    uvicorn.run(
        create_app(settings, core=core),
        workers=1,
        lifespan="on",
        timeout_graceful_shutdown=10,
        # uvloop, the httptools protocol with the connection bound and the request-head deadline, address, logs
        **uvicorn_options(settings, core.metrics),
    )
    return 0


def _refuse(message: str, exc: BaseException, settings: Settings) -> int:
    """One line `vlltr serve: <message>` on stderr (after the traceback at log level debug); the exit status."""
    if settings.log_level == "debug":
        traceback.print_exception(exc, file=sys.stderr)
    print(f"vlltr serve: {' '.join(message.split())}", file=sys.stderr)
    return START_ERROR_STATUS


if __name__ == "__main__":
    raise SystemExit(main())
