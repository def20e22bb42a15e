"""Turn `pip install --dry-run --report` output into pip calls that keep the install's peak disk use low.

pip downloads every wheel of one call before it installs any, and keeps them until the call ends. With torch's
CUDA build that is about 3 GB of wheels on top of about 6.5 GB installed, and a CI machine with 9 GB free fails
half-way. Installing the large wheels (torch, triton, the nvidia and cuda packages) one per call, and the rest in
one call, bounds the extra space by the largest single wheel. Reads the report on stdin; each line printed is the
URLs of one pip call.
"""

from __future__ import annotations

import json
import re
import sys

# Distributions whose wheels are hundreds of MB each: torch's CUDA build and the libraries it pulls in.
_LARGE = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def plan(report: dict) -> list[list[str]]:
    """Group the report's wheels into pip calls: each large one alone, all the others together."""
    large: list[list[str]] = []
    rest: list[str] = []
    for item in report["install"]:
        if item.get("is_direct"):  # the project itself, installed last with its dependency check
            continue
        url = item["download_info"]["url"]
        if _LARGE.match(_canonical(item["metadata"]["name"])):
            large.append([url])
        else:
            rest.append(url)
    return [*large, rest] if rest else large


def main() -> None:
    for call in plan(json.load(sys.stdin)):
        print(" ".join(call))


if __name__ == "__main__":
    main()
