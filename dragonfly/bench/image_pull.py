"""
Scenario 5, image pull: needs the registry mirror (issue 3), which does not
exist yet.  Until it does the scenario says so, and never passes.
"""

from dragonfly.bench.common import Context
from dragonfly.bench.report import SKIP, Line, Section


def run(ctx: Context) -> Section:
    return Section(
        "5. Image pull",
        [
            Line(
                "5 image pull",
                "-",
                "-",
                "-",
                "-",
                SKIP,
                "needs the registry mirror, issue 3",
            )
        ],
    )
