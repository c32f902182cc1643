"""The dependency list of pyproject.toml (core plus extras) as requirement lines, so a container build can install
dependencies in a cached layer before the source is copied. Standard library only: it runs before anything is installed.

    python requirements.py pyproject.toml serve                 # core + serve extra
    python requirements.py pyproject.toml train serve --only torch
    python requirements.py pyproject.toml gpu --no-core
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path


def requirement_name(requirement: str) -> str:
    """The normalised project name of a PEP 508 line (`uvicorn[standard]>=0.29` → `uvicorn`)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: Path, extras: list[str], core: bool = True, only: list[str] | None = None,
                 without: list[str] | None = None) -> list[str]:
    """Requirement lines of the core dependencies (unless `core=False`) and `extras`, first occurrence kept;
    `only` keeps just those names, `without` drops those names."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise ValueError(f"unknown extras {unknown}; pyproject defines {sorted(optional)}")
    lines = list(project["dependencies"]) if core else []
    for extra in extras:
        lines += optional[extra]
    keep = {requirement_name(n) for n in only} if only else None
    drop = {requirement_name(n) for n in without or []}
    chosen, seen = [], set()
    for line in lines:
        name = requirement_name(line)
        if name in drop or (keep is not None and name not in keep) or line in seen:
            continue
        seen.add(line)
        chosen.append(line)
    return chosen


def requirement_lines(argv: list[str]) -> list[str]:
    """The requirement lines for a command line (`PYPROJECT [EXTRA ...] [--no-core] [--only N ...] [--without N ...]`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("extras", nargs="*")
    parser.add_argument("--no-core", action="store_true", help="Leave out [project] dependencies.")
    parser.add_argument("--only", nargs="+", help="Keep only these project names.")
    parser.add_argument("--without", nargs="+", help="Leave out these project names.")
    args = parser.parse_args(argv)
    return requirements(args.pyproject, args.extras, core=not args.no_core, only=args.only, without=args.without)


def main() -> None:
    sys.stdout.write("".join(f"{line}\n" for line in requirement_lines(sys.argv[1:])))


if __name__ == "__main__":
    main()
