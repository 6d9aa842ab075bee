"""The `objective` section: what the model is trained to do (distft.objectives).

`sft` (the default) is next-token NLL over the target tokens. `dpo`, `simpo`, `orpo` and
`reward` train on preference pairs (`data.format: preference`): `dpo` against a frozen
reference (the starting weights), either precomputed once before training (no reference
model in memory while training) or resident; `simpo` and `orpo` need no reference;
`reward` trains a reward model (a one-output sequence classifier) with the Bradley-Terry
loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from distft.config.base import _Section

if TYPE_CHECKING:
    from distft.config.sections import Config

PREFERENCE = ("dpo", "simpo", "orpo", "reward")  # the methods that train on pairs


class DpoConfig(_Section):
    beta: float = Field(0.1, gt=0, description="Weight of the log-ratio margin.")
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO (Rafailov et al.); ipo: IPO (Azar et al.)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="sigmoid only: assumed rate of flipped labels (cDPO)."
    )
    reference: Literal["precomputed", "resident"] = Field(
        "precomputed",
        description="precomputed: one pass before training stores the reference's "
        "log-probs next to the data cache; resident: a frozen copy (LoRA: adapters off) "
        "computes them every step.",
    )


class SimpoConfig(_Section):
    beta: float = Field(2.0, gt=0, description="Weight of the length-normalised margin.")
    gamma: float = Field(0.5, ge=0, description="Target reward margin.")


class OrpoConfig(_Section):
    weight: float = Field(0.1, gt=0, description="Weight of the odds-ratio term (lambda).")


class RewardConfig(_Section):
    center_coefficient: float = Field(
        0.0,
        ge=0,
        description="Weight of (r_chosen + r_rejected)^2, which keeps rewards centred on 0 "
        "(TRL's center_rewards_coefficient; 0.01 is its suggestion).",
    )


class ObjectiveConfig(_Section):
    method: Literal["sft", "dpo", "simpo", "orpo", "reward"] = Field(
        "sft",
        description="sft: next-token NLL; dpo/simpo/orpo: preference tuning; reward: a reward "
        "model (sequence classifier) on preference pairs.",
    )
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    simpo: SimpoConfig = Field(default_factory=SimpoConfig)
    orpo: OrpoConfig = Field(default_factory=OrpoConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)

    @property
    def preference(self) -> bool:
        return self.method in PREFERENCE


def objective_problems(self: Config) -> list[str]:
    """A preference method needs pairs (and pairs need one), and what it does not take
    yet. (`model.loss_chunk_size` is SFT's: a preference loss needs each response's
    per-token log-probs, so its head runs on the response rows at once.)"""
    method, data = self.objective.method, self.data
    formats = {data.format} | {s.format or data.format for s in (*data.sources, *data.eval_sources)}
    out = []
    if self.objective.preference:
        if formats - {"preference", "auto"}:
            bad = sorted(formats - {"preference", "auto"})
            out.append(
                f"objective.method: {method!r} trains on preference pairs; data.format "
                f"{', '.join(bad)} has none (use data.format: preference)"
            )
        if self.deepspeed.sequence_parallel_size > 1:
            out.append(
                f"deepspeed.sequence_parallel_size: not supported with objective.method {method!r}"
            )
    elif "preference" in formats:
        out.append(
            "data.format: 'preference' pairs need a preference objective "
            "(objective.method: dpo, simpo, orpo or reward)"
        )
    return out
