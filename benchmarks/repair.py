"""Repair on the collapsing deep narrow networks: untreated runs against repaired ones.

For each scenario of ``reludoctor.scenarios.REPAIR_SCENARIOS`` (deep narrow ReLU MLPs on 2-D
toy tasks, most of which collapse untreated, and wide healthy controls) and each seed, the
same setup is trained twice: untreated (unwatched) and with a repair mode of ``rd.watch``
(``--mode revive``: live revival, ``revive=True``; ``--mode repair``: the autopilot,
``repair=True``). Each row says whether the run ended
collapsed (every validation input gets the same output), its validation metric (accuracy,
or R^2 for the regression) and the repaired run's wall time over the untreated one's.
The summary gives the share of collapsing runs that the repair rescued (not collapsed, and
the metric clearly above chance: by half the way from chance to perfect), the metric change
on runs that did not collapse untreated (harm, with the spread across seeds), and the median
time ratio.

    python benchmarks/repair.py [--seeds 5] [--mode revive|repair] [--only narrow-circles ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from reludoctor.api.monitor import silenced_live_findings
from reludoctor.scenarios import REPAIR_SCENARIOS, DeepNarrow, collapsed

MODES = {"revive": {"revive": True}, "repair": {"repair": True}}


@dataclasses.dataclass
class Outcome:
    collapsed: bool
    metric: float
    seconds: float


def train(scenario: DeepNarrow, watch_kwargs: dict | None) -> Outcome:
    setup = scenario.build()
    started = time.perf_counter()
    with silenced_live_findings():
        scenario.run(watch=watch_kwargs is not None, setup=setup, **(watch_kwargs or {}))
    seconds = time.perf_counter() - started
    model = setup.model
    return Outcome(collapsed(model, setup.val[0]), scenario.metric(model, setup), seconds)


def rescued(scenario: DeepNarrow, outcome: Outcome) -> bool:
    """Not collapsed, and the metric at least half way from chance to perfect."""
    return not outcome.collapsed and outcome.metric >= (scenario.chance + 1.0) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--mode", choices=sorted(MODES), default="revive")
    parser.add_argument("--only", nargs="*", choices=sorted(REPAIR_SCENARIOS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.only or list(REPAIR_SCENARIOS)
    print(f"{'scenario':18} seed  untreated          {args.mode:18} time")
    collapsing = saved = 0
    harm: list[float] = []
    ratios: list[float] = []
    for name in names:
        for seed in range(args.seeds):
            scenario = dataclasses.replace(REPAIR_SCENARIOS[name], seed=seed)
            plain = train(scenario, None)
            repaired = train(scenario, MODES[args.mode])
            ratios.append(repaired.seconds / plain.seconds)
            if plain.collapsed:
                collapsing += 1
                saved += rescued(scenario, repaired)
            else:
                harm.append(repaired.metric - plain.metric)
            print(
                f"{name:18} {seed:4}  {'collapsed' if plain.collapsed else 'learning':9} "
                f"{plain.metric:6.3f}   {'collapsed' if repaired.collapsed else 'learning':9} "
                f"{repaired.metric:6.3f}   {ratios[-1]:.2f}x"
            )
    print(f"rescued: {saved} of {collapsing} collapsing runs")
    if harm:
        spread = statistics.stdev(harm) if len(harm) > 1 else 0.0
        print(
            f"metric change on the {len(harm)} runs that did not collapse: mean "
            f"{statistics.mean(harm):+.3f}, worst {min(harm):+.3f}, std {spread:.3f}"
        )
    print(f"time, repaired over untreated: median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
