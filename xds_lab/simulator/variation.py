"""The realistic model's randomness for one server, seeded so that a run can be replayed.

Three independent streams, so that one does not shift another: output lengths are drawn in
submission order (the same requests in the same order get the same lengths, however the steps
were timed), step jitter in step order, and the speed factor once. Each stream is seeded from
`seed` and the server's identity (its name, or its index among the servers of one process),
so servers of one profile differ from each other yet replay the same. The legacy model draws
nothing: every factor is exactly 1 and every output is `max_tokens`.
"""

from __future__ import annotations

import math
import random

from xds_lab.simulator.options import LEGACY, SimulatorConfig

__all__ = ["Variation"]


class Variation:
    def __init__(self, identity: str, config: SimulatorConfig) -> None:
        self._identity = identity
        self._seed = -1
        self.reseed(config)

    def reseed(self, config: SimulatorConfig) -> None:
        """Restart the streams when the seed changed (a runtime `seed` override)."""
        if config.seed == self._seed:
            return
        self._seed = config.seed
        root = f"{config.seed}/{self._identity}"
        self._lengths = random.Random(f"{root}/lengths")
        self._jitter = random.Random(f"{root}/jitter")
        self._speed = random.Random(f"{root}/speed").uniform(-1.0, 1.0)

    def speed_factor(self, config: SimulatorConfig) -> float:
        """This server's speed relative to its profile, 1 - spread .. 1 + spread (1.04: its
        steps take 1/1.04 of the profile's time)."""
        if config.engine_model == LEGACY:
            return 1.0
        return 1.0 + config.speed_spread * self._speed

    def step_factor(self, config: SimulatorConfig) -> float:
        """The next step's time multiplier: a lognormal jitter of mean 1 over the speed."""
        if config.engine_model == LEGACY:
            return 1.0
        sigma = config.step_jitter
        jitter = math.exp(sigma * self._jitter.gauss(0.0, 1.0) - sigma * sigma / 2)
        return jitter / self.speed_factor(config)

    def output_tokens(self, config: SimulatorConfig, max_tokens: int) -> int:
        """How many tokens the next submitted request generates: 1..max_tokens."""
        if config.engine_model == LEGACY:
            return max_tokens
        median = config.output_median_fraction * max_tokens
        drawn = self._lengths.lognormvariate(math.log(median), config.output_sigma)
        return max(1, min(max_tokens, round(drawn)))
