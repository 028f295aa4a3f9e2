"""Which weight MatMuls/Gemms to keep in float: a greedy search by measured sensitivity.

Every step asks, for each candidate node, how close the quantized model comes to the reference on
the *fit* rows if that node also stays float (``SwitchModel``: one run per question), and keeps
the node that helps most. The nodes' effects interact (MiniLM on AVX2: keeping layer 1's FFN
output dense float alone does not move the check rows' minimum; with layers 2 and 0 added it
jumps from 0.989 to 0.995), so a one-shot leave-one-out ranking is not the best set. The search
re-ranks after each choice, lazily: every node is measured at the start; after that, nodes in the
order of their last measured gain, at least ``recheck`` of them and then only while a node's last
gain could still beat the best fresh one (a node's gain mostly shrinks as others go float).

It stops at the first of:

* the *check* rows reach the goal (the job's threshold plus a margin): the fewest nodes found;
* the next node would take the predicted latency past ``max_ratio`` of the float model: the speed
  advantage is gone. The prediction interpolates between the all-int8 ratio (measured, paired)
  and 1.0 by the share of multiply-adds kept float, which is what a float MatMul costs;
* ``max_nodes`` nodes, the time budget, or no candidate lowering the fit rows' error.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from worker.support.quant_calibration import CalibrationSplit, Score, score
from worker.support.quant_switch import SwitchModel, WeightNode

REACHED, SPEED, MOST_NODES, BUDGET, NO_GAIN = (
    "reached the goal on the check rows", "speed advantage gone", "max_float_ops reached",
    "tuning budget spent", "no node helps further")


@dataclass(frozen=True)
class CostModel:
    """Predicted latency ratio vs float when some nodes stay float: linear in their multiply-adds."""

    int8_ratio: float  # the all-int8 model's measured ratio
    total_macs: int  # multiply-adds of every node the switch model can keep float

    def ratio(self, nodes: Sequence[WeightNode]) -> float:
        share = sum(node.macs for node in nodes) / self.total_macs if self.total_macs else 0.0
        return self.int8_ratio + (1.0 - self.int8_ratio) * share


@dataclass(frozen=True)
class IslandStep:
    node: WeightNode
    fit: Score  # with this node and the ones before it in float
    check: Score
    predicted_ratio: float

    def to_dict(self, before: Score) -> dict:
        return {"node": self.node.name, "op": self.node.op_type, "fit": self.fit.to_dict(),
                "check": self.check.to_dict(),
                "check_cosine_min_gain": round(self.check.cosine_min - before.cosine_min, 5),
                "predicted_latency_ratio": round(self.predicted_ratio, 4)}


@dataclass
class IslandSearch:
    start_fit: Score
    start_check: Score
    steps: list[IslandStep] = field(default_factory=list)
    stopped: str = ""
    evaluations: int = 0
    seconds: float = 0.0

    @property
    def nodes(self) -> list[WeightNode]:
        return [step.node for step in self.steps]

    def best_prefix(self, goal: float) -> int:
        """How many of the steps to keep: all when the goal was reached, else the prefix with the
        highest check minimum (fewest nodes on ties)."""
        if self.stopped == REACHED or not self.steps:
            return len(self.steps)
        minima = [self.start_check.cosine_min] + [step.check.cosine_min for step in self.steps]
        return max(range(len(minima)), key=lambda i: (minima[i] >= goal, minima[i], -i))

    def to_dict(self) -> dict:
        steps, before = [], self.start_check
        for step in self.steps:
            steps.append(step.to_dict(before))
            before = step.check
        return {"start": {"fit": self.start_fit.to_dict(), "check": self.start_check.to_dict()}, "steps": steps,
                "stopped": self.stopped, "evaluations": self.evaluations, "seconds": round(self.seconds, 1)}


def search_float_islands(switch: SwitchModel, split: CalibrationSplit, goal: float, cost: CostModel, *,
                         max_nodes: int, max_ratio: float, deadline: float, recheck: int = 6) -> IslandSearch:
    """Greedy, lazily re-ranked choice of nodes to keep float until the check rows reach ``goal``."""
    started = time.monotonic()
    kept: list[WeightNode] = []
    evaluations = 0

    def fit_error(nodes: list[WeightNode]) -> Score:
        nonlocal evaluations
        evaluations += 1
        return score(split.fit_reference, switch.run(split.fit, [n.name for n in nodes]))

    def check_score(nodes: list[WeightNode]) -> Score:
        return score(split.check_reference, switch.run(split.check, [n.name for n in nodes]))

    search = IslandSearch(start_fit=fit_error([]), start_check=check_score([]))
    current = search.start_fit
    gains = {node.name: float("inf") for node in switch.nodes}  # last measured drop in fit error; inf: never
    while True:
        reached = (search.steps[-1].check if search.steps else search.start_check).cosine_min >= goal
        if reached or len(kept) >= max_nodes:
            search.stopped = REACHED if reached else MOST_NODES
            break
        affordable = sorted((node for node in switch.nodes if node.name in gains
                             and cost.ratio(kept + [node]) <= max_ratio), key=lambda n: -gains[n.name])
        fresh: dict[str, Score] = {}
        for node in affordable:
            best_gain = max((current.tail_error - f.tail_error for f in fresh.values()), default=float("-inf"))
            if len(fresh) >= recheck and gains[node.name] <= best_gain:
                break  # lazy: a stale gain this low will not beat the best fresh one
            if time.monotonic() > deadline:
                search.stopped = BUDGET
                break
            fresh[node.name] = fit_error(kept + [node])
            gains[node.name] = current.tail_error - fresh[node.name].tail_error
        if search.stopped:
            break
        if not fresh:
            search.stopped = SPEED if gains else NO_GAIN
            break
        best_name = min(fresh, key=lambda name: fresh[name].tail_error)
        best = next(node for node in affordable if node.name == best_name)
        if fresh[best.name].tail_error >= current.tail_error:
            search.stopped = NO_GAIN
            break
        kept.append(best)
        current = fresh.pop(best.name)
        gains.pop(best.name)
        search.steps.append(IslandStep(best, current, check_score(kept), cost.ratio(kept)))
    search.evaluations = evaluations
    search.seconds = time.monotonic() - started
    return search
