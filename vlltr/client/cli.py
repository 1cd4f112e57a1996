"""`vlltr classify` and `vlltr classes list|add|delete`: the command line on top of `vlltr.client.Client`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from vlltr.client import Client, Prediction
from vlltr.errors import ClassValidationError


def _describe(p: Prediction, explain: bool) -> list[str]:
    lines = [f"  {p.score:6.3f}  {p.label}"]
    e = p.explanation
    if explain and e is not None:
        lines.append(
            f"          vision {e.vision:.3f}, language {e.language:.3f} (alpha {e.alpha:.2f}, T {e.temperature:.2f})"
        )
        lines.extend(f"          {a.weight:5.2f}  {a.text}" for a in e.anchors)
    return lines


def classify_command(images: list[str], *, url: str, top_k: int, explain: bool, as_json: bool) -> int:
    """Classify `images` (one batch request per 32) and print each image's classes; 1 if any image failed."""
    for image in images:
        if not Path(image).is_file():
            raise FileNotFoundError(f"no such image file: {image}")
    failed = 0
    with Client(url) as client:
        results = client.classify_many(images, top_k=top_k, explain=explain)
    for image, result in zip(images, results):
        if as_json:
            print(json.dumps({"image": image, **asdict(result)}))
            continue
        if result.error is not None:
            failed += 1
            print(f"{image}: error {result.status} {result.error.code}: {result.error.message}")
            continue
        print(f"{image}:" + (" unknown (far from every class)" if result.unknown else ""))
        for p in result.predictions or ():
            print("\n".join(_describe(p, explain)))
    return 1 if failed else 0


def classes_command(args: argparse.Namespace) -> int:
    """`vlltr classes list|add|delete` against a running service."""
    with Client(args.url, admin_token=args.token) as client:
        if args.action == "list":
            table = client.classes()
            print(f"{'id':>5}  {'source':7}  {'tier':6}  {'train':>5}  name")
            for c in table.classes:
                print(f"{c.class_id:>5}  {c.source:7}  {c.tier:6}  {c.train_count:>5}  {c.name}")
            print(f"{len(table.classes)} classes, table version {table.class_table_version}", file=sys.stderr)
            return 0
        if args.action == "add":
            descriptions = list(args.descriptions)
            if args.file is not None:
                descriptions += [line.strip() for line in args.file.read_text().splitlines() if line.strip()]
            if not descriptions:
                raise ClassValidationError("give the class's descriptions as arguments or with --file")
            added = client.add_class(args.name, descriptions)
            print(f"{'added' if added.created else 'already there:'} {added.name} (class {added.class_id})")
            for a in added.anchors or ():
                print(f"  anchor: {a}")
            for warning in added.warnings:
                print(f"  warning: {warning}", file=sys.stderr)
            return 0
        client.delete_class(args.name)
        print(f"deleted {args.name}")
        return 0
