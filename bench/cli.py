"""What the benchmarks' command lines share: the first paragraph of the module's docstring as
the description, `--json` for the figures, and the hidden `--role` a benchmark passes to the
copies of itself it starts as separate processes (a server, an upstream), so that what is
measured and what measures it do not share a CPU-bound event loop."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

#: A role a child process plays: a coroutine to run until it is stopped, built from the args.
Role = Callable[[argparse.Namespace], Coroutine[Any, Any, Any]]


def parser(doc: str, roles: Mapping[str, Role] | None = None) -> argparse.ArgumentParser:
    """The benchmark's parser with `--json` and, when it starts copies of itself, `--role`."""
    made = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    made.add_argument("--json", type=Path, help="also write the figures to this file")
    if roles:
        choices = ("bench", *roles)
        made.add_argument("--role", choices=choices, default="bench", help=argparse.SUPPRESS)
    return made


def played_role(args: argparse.Namespace, roles: Mapping[str, Role]) -> bool:
    """Runs the role this process was started for, if any; False when it is the benchmark."""
    role = roles.get(getattr(args, "role", "bench"))
    if role is None:
        return False
    asyncio.run(role(args))
    return True


def publish(text: str, figures: Any, path: Path | None) -> None:
    """Prints the report and, when asked, writes the figures as JSON."""
    print(text)
    if path is not None:
        path.write_text(json.dumps(figures, indent=2) + "\n")
