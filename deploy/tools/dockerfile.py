"""A small reader for the project's Dockerfile: stages, their instructions, the serving entrypoint.

Enough of the Dockerfile grammar for checks on our own file (line continuations, comments, JSON
and shell forms); it is not a general parser. The topology test takes the command it runs from
here, so the replicas it starts run exactly what the serving images run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"
SERVING_STAGES = ("serve-cpu", "serve-gpu")


@dataclass
class Instruction:
    """One instruction: upper-cased keyword and its raw argument text (continuations joined)."""

    keyword: str
    args: str
    line: int

    def json_args(self) -> list[str]:
        """The JSON (exec) form of the arguments; ValueError naming the line if it is not one."""
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Dockerfile line {self.line}: {self.keyword} is not in JSON form: {self.args}") from exc
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"Dockerfile line {self.line}: {self.keyword} must be a JSON list of strings")
        return value


@dataclass
class Stage:
    """A build stage: its base image expression, name and instructions after FROM."""

    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        """Instructions of one kind, in order."""
        return [i for i in self.instructions if i.keyword == keyword.upper()]

    def last(self, keyword: str) -> Instruction | None:
        """The effective (last) instruction of one kind, if any."""
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """The variables this stage's ENV instructions set (``KEY=value`` form, unquoted values), last wins."""
        values: dict[str, str] = {}
        for inst in self.all("ENV"):
            for part in inst.args.split():
                key, sep, value = part.partition("=")
                if not sep:
                    raise ValueError(f"Dockerfile line {inst.line}: ENV must use the KEY=value form")
                values[key] = value
        return values


def instructions(text: str) -> list[Instruction]:
    """Split Dockerfile text into instructions, joining ``\\`` continuations and dropping comments."""
    out: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are skipped by Docker too
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        joined = " ".join(part for part in buffer if part)
        buffer = []
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    if buffer:
        raise ValueError(f"Dockerfile line {start}: instruction ends with a dangling line continuation")
    return out


def stages(path: Path = DOCKERFILE) -> dict[str, Stage]:
    """The named stages of a Dockerfile, in order; ValueError if a stage has no name."""
    result: dict[str, Stage] = {}
    current: Stage | None = None
    for inst in instructions(path.read_text(encoding="utf-8")):
        if inst.keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)", inst.args, flags=re.IGNORECASE)
            if not match:
                raise ValueError(f"Dockerfile line {inst.line}: every stage needs a name (FROM image AS name)")
            current = Stage(base=match.group(1), name=match.group(2))
            result[current.name] = current
        elif current is not None:
            current.instructions.append(inst)
    return result


def build_args(path: Path = DOCKERFILE) -> dict[str, str]:
    """Global ``ARG NAME=default`` values declared before the first FROM."""
    values: dict[str, str] = {}
    for inst in instructions(path.read_text(encoding="utf-8")):
        if inst.keyword == "FROM":
            break
        if inst.keyword == "ARG" and "=" in inst.args:
            name, _, default = inst.args.partition("=")
            values[name.strip()] = default.strip()
    return values


def serve_command(host: str, port: int, path: Path = DOCKERFILE, stage: str = "serve-cpu") -> list[str]:
    """The serving image's entrypoint with its ``--host``/``--port`` values replaced.

    Raises ValueError when the entrypoint lacks either option, so the tests cannot drift from the
    image by starting the service some other way.
    """
    found = stages(path)
    if stage not in found:
        raise ValueError(f"the Dockerfile has no stage named {stage!r}")
    entry = found[stage].last("ENTRYPOINT")
    if entry is None:
        raise ValueError(f"Dockerfile stage {stage!r} has no ENTRYPOINT")
    command = entry.json_args()
    for option, value in (("--host", host), ("--port", str(port))):
        if option not in command or command.index(option) + 1 >= len(command):
            raise ValueError(f"the {stage} ENTRYPOINT {command} does not set {option}")
        command[command.index(option) + 1] = value
    return command
