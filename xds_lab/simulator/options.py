"""The simulator's parameters: what each one means, the hardware profiles, validation.

Every parameter is declared once, with its help text, so the dataclass, the CLI flags and
the runtime overrides of `POST /admin/profile` cannot drift apart.

Two engine models (`engine_model`): `realistic` (the default) steps like vLLM's V1 scheduler
with chunked prefill under a token budget, decode steps that cost more with every running
sequence and every token of context they attend to, output lengths drawn below `max_tokens`,
a little step-time jitter and a per-server speed factor; `legacy` is the deterministic model
before issue 15, kept exact so that results measured with it stay comparable.

Defaults are chosen for this kind of 2-core machine: one `fast` server decodes about 2,000
tokens/s at a full batch of 250-token contexts (~2,600 in the legacy model) while its engine
wakes at most ~125 times a second, so 4-8 simulators, an Envoy and a load generator fit on
2 cores.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from xds_lab.simulator.orca import SIGNALS, VLLM

__all__ = [
    "BLOCK_TOKENS",
    "ENGINE_MODELS",
    "LEGACY",
    "PROFILES",
    "REALISTIC",
    "SimulatorConfig",
    "add_arguments",
    "config_from_args",
    "to_arguments",
]

#: Tokens per KV-cache block (vLLM's default `--block-size`). Fixed, so that cache
#: accounting stays valid when the cache size changes at runtime.
BLOCK_TOKENS = 16

REALISTIC = "realistic"
LEGACY = "legacy"
ENGINE_MODELS = (REALISTIC, LEGACY)

#: Values that differ between the profiles. `fast` is A100-like for an 8B model; `slow` runs
#: at half its speed with half its KV cache (an older or shared GPU); `small` computes at 80 %
#: of `fast`'s speed with a quarter of its KV cache (a GPU with less memory): it fills its cache
#: and preempts long before its batch is full. The per-KV-token cost puts a full cache at
#: about 1.6 base steps on `fast` and `slow` (KV reads dominate a real decode step at long
#: contexts); scale it up by k when the cache is scaled down by k to keep that ratio.
PROFILES: dict[str, dict[str, Any]] = {
    "fast": {
        "kv_cache_tokens": 32768,
        "prefill_tokens_per_s": 16000.0,
        "decode_step_base_s": 0.008,
        "decode_step_per_seq_s": 0.00025,
        "decode_step_per_kv_token_s": 4e-7,
    },
    "slow": {
        "kv_cache_tokens": 16384,
        "prefill_tokens_per_s": 8000.0,
        "decode_step_base_s": 0.016,
        "decode_step_per_seq_s": 0.0005,
        "decode_step_per_kv_token_s": 8e-7,
    },
    "small": {
        "kv_cache_tokens": 8192,
        "prefill_tokens_per_s": 12800.0,
        "decode_step_base_s": 0.01,
        "decode_step_per_seq_s": 0.0003125,
        "decode_step_per_kv_token_s": 5e-7,
    },
}
_FAST = PROFILES["fast"]
_REALISTIC_ONLY = " [realistic model only]"


def _param(
    default: Any,
    doc: str,
    low: float | None = None,
    strict: bool = False,
    high: float | None = None,
    choices: tuple[str, ...] = (),
) -> Any:
    """A dataclass field carrying its help text and bounds (`strict`: must exceed `low`;
    `high` is inclusive) or its allowed values."""
    meta = {"help": doc, "low": low, "strict": strict, "high": high, "choices": choices}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class SimulatorConfig:
    """One simulated model server. Durations are simulated seconds, scaled by `time_scale`."""

    model: str = _param("llama-3-8b", "served model name (OpenAI `model`, metric label)")
    engine_model: str = _param(
        REALISTIC,
        "realistic: chunked prefill, context-dependent steps, drawn output lengths, jitter, "
        "per-server speed; legacy: the deterministic model before issue 15 (every request "
        "generates max_tokens, step = prefill + base + per_seq * running, identical servers)",
        choices=ENGINE_MODELS,
    )
    max_num_seqs: int = _param(
        64, "most sequences decoding at once in one batch (vLLM --max-num-seqs)", low=1
    )
    max_num_batched_tokens: int = _param(
        2048,
        "tokens one step computes, decodes first, then prefill chunks of waiting or partly "
        "prefilled requests (vLLM --max-num-batched-tokens: 2048 for its OpenAI server on an "
        "A100)" + _REALISTIC_ONLY,
        low=1,
    )
    kv_cache_tokens: int = _param(
        _FAST["kv_cache_tokens"],
        f"KV-cache capacity in tokens, allocated in blocks of {BLOCK_TOKENS}; a request "
        "waits until its first prefill chunk fits (legacy: its prompt + 1 block)",
        low=2 * BLOCK_TOKENS,
    )
    prefill_tokens_per_s: float = _param(
        _FAST["prefill_tokens_per_s"],
        "prompt tokens computed per second (a step's prefill chunks; legacy: whole prompts "
        "at admission)",
        low=0,
        strict=True,
    )
    decode_step_base_s: float = _param(
        _FAST["decode_step_base_s"],
        "fixed cost of one step (one token for every decoding sequence)",
        low=0,
        strict=True,
    )
    decode_step_per_seq_s: float = _param(
        _FAST["decode_step_per_seq_s"],
        "added step cost per sequence in the batch: per-sequence speed drops as the batch grows",
        low=0,
    )
    decode_step_per_kv_token_s: float = _param(
        _FAST["decode_step_per_kv_token_s"],
        "added step cost per token of context the batch attends to (attention reads the KV "
        "cache)" + _REALISTIC_ONLY,
        low=0,
    )
    output_median_fraction: float = _param(
        0.5,
        "median output length as a fraction of the request's max_tokens; lengths are "
        "lognormal, capped at max_tokens (finish_reason length), else stop" + _REALISTIC_ONLY,
        low=0,
        strict=True,
    )
    output_sigma: float = _param(
        0.8,
        "spread of the output lengths: sigma of their logarithm (0: always the median)"
        + _REALISTIC_ONLY,
        low=0,
    )
    step_jitter: float = _param(
        0.03,
        "spread of each step's duration: sigma of the log of a mean-1 factor" + _REALISTIC_ONLY,
        low=0,
        high=0.5,
    )
    speed_spread: float = _param(
        0.05,
        "servers of one profile differ: each runs at a speed factor drawn once from "
        "1 +- this (1.04: its steps take 1/1.04 of the profile's time)" + _REALISTIC_ONLY,
        low=0,
        high=0.5,
    )
    seed: int = _param(
        0,
        "seeds output lengths, jitter and speed factor; each server mixes in its name or "
        "its index among --count servers, so they differ yet replay the same" + _REALISTIC_ONLY,
        low=0,
    )
    max_waiting: int = _param(
        100_000, "waiting-queue bound; beyond it requests get 503 (vLLM's default: none)", low=1
    )
    time_scale: float = _param(
        1.0, "multiplies every simulated duration (0.1 runs ten times faster)", low=0, strict=True
    )
    orca_signals: str = _param(
        VLLM,
        "what ORCA reports carry: vllm (exactly vLLM: kv_cache_usage_perc and "
        "num_requests_waiting, on non-streamed answers only), vllm-streams (also on streams), "
        "cswrr (vllm-streams + application_utilization and rps_fractional, which Envoy's "
        "client_side_weighted_round_robin needs), cswrr-kv (vllm-streams + rps_fractional)",
        choices=SIGNALS,
    )

    def __post_init__(self) -> None:
        for spec in fields(self):
            _check(spec.name, str(spec.type), getattr(self, spec.name), spec.metadata)
        if self.engine_model == REALISTIC and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}), as vLLM requires"
            )

    @classmethod
    def profile(cls, name: str, **overrides: Any) -> SimulatorConfig:
        """The named profile (see PROFILES) with `overrides` applied on top."""
        if name not in PROFILES:
            raise ValueError(f"unknown profile {name!r}; expected one of {sorted(PROFILES)}")
        return cls(**{**PROFILES[name], **overrides})

    def with_overrides(self, changes: Mapping[str, Any]) -> SimulatorConfig:
        """A copy with `changes` applied; `"profile": NAME` first resets the hardware values.

        For runtime changes (`POST /admin/profile`): unknown names and bad values raise
        ValueError and leave this config as it was.
        """
        changes = dict(changes)
        profile = changes.pop("profile", None)
        unknown = sorted(set(changes) - {spec.name for spec in fields(self)})
        if unknown:
            raise ValueError(f"unknown parameters: {', '.join(unknown)}")
        if profile is not None:
            if not isinstance(profile, str) or profile not in PROFILES:
                raise ValueError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
            changes = {**PROFILES[profile], **changes}
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(name: str, kind: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Type, bounds and allowed values of one field; `kind` is the annotation string."""
    types = {"str": (str,), "int": (int,), "float": (int, float)}[kind]
    if not isinstance(value, types) or isinstance(value, bool):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if kind == "str" and not value:
        raise ValueError(f"{name} must not be empty")
    if meta["choices"] and value not in meta["choices"]:
        raise ValueError(f"{name} must be one of {', '.join(meta['choices'])}, got {value!r}")
    low, high = meta["low"], meta["high"]
    if low is not None and (value <= low if meta["strict"] else value < low):
        raise ValueError(f"{name} must be {'>' if meta['strict'] else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--profile` and one flag per parameter; unset flags keep the profile's value."""
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="fast",
        help="hardware profile: fast (A100-like), slow (half the speed, half the KV cache) or "
        "small (80%% of fast's speed, a quarter of its KV cache)",
    )
    for spec in fields(SimulatorConfig):
        flag = _flag(spec.name)
        by_profile = ", ".join(
            f"{profile}: {values[spec.name]}"
            for profile, values in PROFILES.items()
            if spec.name in values
        )
        default = by_profile or f"default: {spec.default}"
        help_text = f"{spec.metadata['help']} ({default})"
        convert = {"str": str, "int": int, "float": float}[str(spec.type)]
        choices = spec.metadata["choices"] or None
        parser.add_argument(flag, type=convert, choices=choices, default=None, help=help_text)


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """The config that `add_arguments` flags describe; ValueError on a bad value."""
    overrides = {
        spec.name: getattr(args, spec.name)
        for spec in fields(SimulatorConfig)
        if getattr(args, spec.name) is not None
    }
    return SimulatorConfig.profile(args.profile, **overrides)


def to_arguments(config: SimulatorConfig) -> list[str]:
    """The flags that `config_from_args` turns back into `config`: every parameter given."""
    argv: list[str] = []
    for name, value in config.as_dict().items():
        argv += [_flag(name), str(value)]
    return argv
