"""SparseDoctorConfig: the adapter's hyper-parameters (the defaults are the ones the method documents)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

QWEN3_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONTRASTIVE_MODES = ("paper", "sequence", "router")
CONTRASTIVE_UPDATES = ("all", "router")
# The contrastive weight each mode was measured best at (benchmarks/results/ablation-*-cpu): the paper's reading
# keeps the library's original 0.1; the router mode at 0.1 costs LM loss on real text, at 0.03 it does not.
CONTRASTIVE_WEIGHT_OF_MODE = {"router": 0.03, "paper": 0.1, "sequence": 0.1}
FLOAT_FIELDS = ("lora_alpha", "lora_dropout", "temperature", "balance_coef", "contrastive_coef")


@dataclass(frozen=True)
class SparseDoctorConfig:
    num_experts: int = 8
    top_k: int = 2
    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = QWEN3_PROJECTIONS
    proj_dim: int = 64
    queue_size: int = 1024
    temperature: float = 0.07
    balance_coef: float = 0.01
    # None: the mode's own weight, CONTRASTIVE_WEIGHT_OF_MODE (0.03 for router, 0.1 for paper and sequence),
    # resolved when the config is built: dataclasses.replace(config, contrastive_mode=...) keeps the old
    # mode's number, so build a new config (or pass contrastive_coef) to switch modes.
    contrastive_coef: float | None = None
    contrastive_tokens: int = 256
    # "router" (the default, chosen by measurement: docs/method.md, "The contrastive objective"): InfoNCE of
    # routing distributions, a token's against its sequence's, other sequences' as negatives; "paper": the routed
    # view against the token's own fused view (our reading of SparseDoctor), with the expert queue's negatives;
    # "sequence": the routed view against the mean fused view of the other picked tokens of its sequence.
    contrastive_mode: str = "router"
    # What the term trains: "all" (experts, router, heads) or "router" (router and heads: this module's experts'
    # outputs enter the views detached, so the term shapes routing without pulling those experts away from the LM
    # loss; through the hidden states a router reads, it still reaches earlier layers).
    contrastive_updates: str = "all"
    # Off means off: at contrastive_coef=0 the term is not computed (no sampling, views, heads or queue writes).
    # True computes it anyway, weighted 0: the ablation's random-stream control, which must draw the same random
    # numbers as the weighted run.
    contrastive_at_zero_weight: bool = False

    def __post_init__(self):
        if isinstance(self.target_modules, str) or not isinstance(self.target_modules, (list, tuple)):
            # A bare string would silently become a tuple of its characters.
            raise ValueError(f"SparseDoctorConfig.target_modules must be a list of module names, "
                             f"got {self.target_modules!r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.contrastive_mode not in CONTRASTIVE_MODES:
            raise ValueError(f"SparseDoctorConfig.contrastive_mode must be one of {', '.join(CONTRASTIVE_MODES)}, "
                             f"got {self.contrastive_mode!r}")
        if self.contrastive_coef is None:
            object.__setattr__(self, "contrastive_coef", CONTRASTIVE_WEIGHT_OF_MODE[self.contrastive_mode])
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            # Checked before any comparison, so a string or NaN read from JSON fails here, naming the field.
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"SparseDoctorConfig.{name} must be a finite number, got {value!r}")
        for name in ("num_experts", "top_k", "r", "proj_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SparseDoctorConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("queue_size", "contrastive_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"SparseDoctorConfig.{name} must be an int >= 0, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"SparseDoctorConfig.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"SparseDoctorConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name in ("balance_coef", "contrastive_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"SparseDoctorConfig.{name} must be >= 0 (a negative loss weight rewards the "
                                 f"term's failure), got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"SparseDoctorConfig.temperature must be > 0, got {self.temperature}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"SparseDoctorConfig.target_modules must name at least one module, "
                             f"got {self.target_modules!r}")
        if not isinstance(self.contrastive_at_zero_weight, bool):
            raise ValueError(f"SparseDoctorConfig.contrastive_at_zero_weight must be True or False, "
                             f"got {self.contrastive_at_zero_weight!r}")
        if self.contrastive_updates not in CONTRASTIVE_UPDATES:
            raise ValueError(f"SparseDoctorConfig.contrastive_updates must be one of {', '.join(CONTRASTIVE_UPDATES)}"
                             f", got {self.contrastive_updates!r}")
        self._check_contrastive_term()

    def _check_contrastive_term(self) -> None:
        """The contrastive term must be able to do something when it is on."""
        if not self.computes_contrastive or self.contrastive_mode == "router":
            return  # the router mode contrasts routing distributions in the batch: no queue, any top_k
        if self.queue_size == 0:
            # No queue, no negatives: the loss would be a constant 0 and silently train nothing.
            raise ValueError("SparseDoctorConfig.queue_size=0 leaves the contrastive term without negatives; "
                             "set queue_size >= 1, or contrastive_coef=0 to train without the term")
        if self.top_k == 1:
            warnings.warn("SparseDoctorConfig.top_k=1: the routed and fused views of a token are then identical, "
                          "so the contrastive term gives the router no gradient (it can still move the experts "
                          "and heads); use top_k >= 2 for the method as described", UserWarning, stacklevel=4)

    @property
    def computes_contrastive(self) -> bool:
        """Whether training computes the contrastive term: it samples tokens and has a weight (or is asked for at
        weight 0, contrastive_at_zero_weight)."""
        return self.contrastive_tokens > 0 and (self.contrastive_coef > 0 or self.contrastive_at_zero_weight)

    @property
    def scaling(self) -> float:
        """s = lora_alpha / r, as in LoRA."""
        return self.lora_alpha / self.r

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SparseDoctorConfig:
        """The config from `to_dict()`'s form; missing fields take their defaults, unknown ones are refused."""
        if not isinstance(data, dict):
            raise ValueError(f"a SparseDoctorConfig is read from a dict of fields, got {type(data).__name__}")
        known = cls.field_names()
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown SparseDoctorConfig fields {unknown} (written by a newer version of "
                             f"sparsedoctor_kernels?); known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
