"""The simulator's parameters: what each one means, the two hardware profiles, validation.

Every parameter is declared once, with its help text, so the dataclass, the CLI flags and
the runtime overrides of `POST /admin/profile` cannot drift apart.

Defaults are chosen for this kind of 2-core machine: one `fast` server decodes about 2,600
tokens/s at a full batch (~26 requests/s of 100-token outputs) while its engine wakes at most
~125 times a second, so 4-6 simulators, an Envoy and a load generator fit on 2 cores.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

#: Tokens per KV-cache block (vLLM's default `--block-size`). Fixed, so that cache
#: accounting stays valid when the cache size changes at runtime.
BLOCK_TOKENS = 16

#: Values that differ between the profiles: `fast` is A100-like for an 8B model, `slow`
#: runs at half its speed with half its KV cache (an older or shared GPU).
PROFILES: dict[str, dict[str, Any]] = {
    "fast": {
        "kv_cache_tokens": 32768,
        "prefill_tokens_per_s": 16000.0,
        "decode_step_base_s": 0.008,
        "decode_step_per_seq_s": 0.00025,
    },
    "slow": {
        "kv_cache_tokens": 16384,
        "prefill_tokens_per_s": 8000.0,
        "decode_step_base_s": 0.016,
        "decode_step_per_seq_s": 0.0005,
    },
}
_FAST = PROFILES["fast"]


def _param(default: Any, doc: str, low: float | None = None, strict: bool = False) -> Any:
    """A dataclass field carrying its help text and bound (`strict`: must exceed `low`)."""
    return field(default=default, metadata={"help": doc, "low": low, "strict": strict})


@dataclass(frozen=True)
class SimulatorConfig:
    """One simulated model server. Durations are simulated seconds, scaled by `time_scale`."""

    model: str = _param("llama-3-8b", "served model name (OpenAI `model`, metric label)")
    max_num_seqs: int = _param(
        64, "most sequences decoding at once in one batch (vLLM --max-num-seqs)", low=1
    )
    kv_cache_tokens: int = _param(
        _FAST["kv_cache_tokens"],
        f"KV-cache capacity in tokens, allocated in blocks of {BLOCK_TOKENS}; a request "
        "waits until its prompt + 1 block fits",
        low=2 * BLOCK_TOKENS,
    )
    prefill_tokens_per_s: float = _param(
        _FAST["prefill_tokens_per_s"],
        "prompt tokens processed per second when a request is admitted (its prefill)",
        low=0,
        strict=True,
    )
    decode_step_base_s: float = _param(
        _FAST["decode_step_base_s"],
        "fixed cost of one decode step (one token for every running sequence)",
        low=0,
        strict=True,
    )
    decode_step_per_seq_s: float = _param(
        _FAST["decode_step_per_seq_s"],
        "added step cost per running sequence: per-sequence speed drops as the batch grows",
        low=0,
    )
    max_waiting: int = _param(
        100_000, "waiting-queue bound; beyond it requests get 503 (vLLM's default: none)", low=1
    )
    time_scale: float = _param(
        1.0, "multiplies every simulated duration (0.1 runs ten times faster)", low=0, strict=True
    )
    orca_rps: bool = _param(
        False,
        "also report application_utilization and rps_fractional in ORCA headers "
        "(for Envoy's client_side_weighted_round_robin; vLLM does not send them)",
    )

    def __post_init__(self) -> None:
        for spec in fields(self):
            _check(spec.name, str(spec.type), getattr(self, spec.name), spec.metadata)

    @classmethod
    def profile(cls, name: str, **overrides: Any) -> SimulatorConfig:
        """The named profile ("fast" or "slow") with `overrides` applied on top."""
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
    """Type and bound of one field; `kind` is the annotation string (postponed annotations)."""
    types = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}[kind]
    if not isinstance(value, types) or (kind != "bool" and isinstance(value, bool)):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if kind == "str" and not value:
        raise ValueError(f"{name} must not be empty")
    low = meta.get("low")
    if low is not None and (value <= low if meta["strict"] else value < low):
        raise ValueError(f"{name} must be {'>' if meta['strict'] else '>='} {low}, got {value!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--profile` and one flag per parameter; unset flags keep the profile's value."""
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="fast",
        help="hardware profile: fast (A100-like) or slow (half the speed, half the KV cache)",
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
        if spec.type == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            convert = {"str": str, "int": int, "float": float}[str(spec.type)]
            parser.add_argument(flag, type=convert, default=None, help=help_text)


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
        if isinstance(value, bool):
            argv += [_flag(name)] if value else []
        else:
            argv += [_flag(name), str(value)]
    return argv
