"""microsweep's own tables, beside Optuna's on the same database URL.

`microsweep_sweeps` keeps one row per sweep with its provenance; `microsweep_trials` one row per
finished trial, with its counts per target layer packed in one value (`layer_counts`, what the
report reads); `microsweep_layers` one row per layer of a trial, the full breakdown, so that SQL
reads per-layer results without unpickling anything. `microsweep_schema` holds the schema
version.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 4

MIGRATIONS: dict[int, list[tuple[str, str]]] = {
    1: [("microsweep_trials", "origin"), ("microsweep_sweeps", "eval_key")],
    2: [
        ("microsweep_sweeps", "owner"),
        ("microsweep_sweeps", "lease_until"),
        ("microsweep_trials", "worker"),
    ],
    3: [("microsweep_sweeps", "summary_layers"), ("microsweep_trials", "layer_counts")],
}
"""The (table, column)s each version adds to the one before, typed as the models declare them
(new tables are created as they come); `Store._migrate` fills version 4's from the layer rows."""

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Base",
    "LayerRow",
    "SchemaRow",
    "SensitivityRow",
    "SweepRow",
    "TrialRow",
]


class Base(DeclarativeBase):
    pass


class SchemaRow(Base):
    __tablename__ = "microsweep_schema"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class SweepRow(Base):
    __tablename__ = "microsweep_sweeps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)
    study_name: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    space_path: Mapped[str] = mapped_column(Text)
    space_source: Mapped[str] = mapped_column(Text)
    space_json: Mapped[dict] = mapped_column(JSON)
    objective_json: Mapped[dict] = mapped_column(JSON)
    model_fingerprint: Mapped[str] = mapped_column(String(64))
    data_fingerprint: Mapped[str] = mapped_column(String(64))
    model_recipe: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    dense_perplexity: Mapped[float] = mapped_column(Float)
    dense_params: Mapped[float] = mapped_column(Float)
    dense_ops: Mapped[float] = mapped_column(Float)
    dense_layers: Mapped[list] = mapped_column(JSON)
    baseline_name: Mapped[str] = mapped_column(String(64))
    baseline_params: Mapped[float] = mapped_column(Float)
    baseline_ops: Mapped[float] = mapped_column(Float)
    ceiling: Mapped[float | None] = mapped_column(Float, nullable=True)
    sampler: Mapped[str] = mapped_column(String(32))
    seed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    target_trials: Mapped[int] = mapped_column(Integer)
    versions: Mapped[dict] = mapped_column(JSON)
    eval_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # the driver running the sweep and when its lease ends (epoch seconds; renewed by heartbeat)
    owner: Mapped[str | None] = mapped_column(String(256), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    # the target layers whose counts each trial's `layer_counts` holds, in its order (v4)
    summary_layers: Mapped[list | None] = mapped_column(JSON, nullable=True)

    trials: Mapped[list[TrialRow]] = relationship(back_populates="sweep", cascade="all, delete")

    @property
    def dense_score(self) -> float:
        """The dense model's MicroNet score against this sweep's baseline."""
        return self.dense_params / self.baseline_params + self.dense_ops / self.baseline_ops


class TrialRow(Base):
    __tablename__ = "microsweep_trials"
    __table_args__ = (UniqueConstraint("sweep_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("microsweep_sweeps.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))  # COMPLETE, PRUNED or FAIL
    origin: Mapped[str | None] = mapped_column(String(32), nullable=True)  # who proposed it
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)  # where it ran (v3)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    perplexity: Mapped[float | None] = mapped_column(Float, nullable=True)
    params: Mapped[float | None] = mapped_column(Float, nullable=True)
    ops: Mapped[float | None] = mapped_column(Float, nullable=True)
    feasible: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    freebie: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    policy: Mapped[dict] = mapped_column(JSON)
    summary: Mapped[str] = mapped_column(Text, default="")
    timings: Mapped[dict] = mapped_column(JSON, default=dict)
    count_config: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    finished_at: Mapped[datetime] = mapped_column(DateTime)
    # (params, ops) of each of the sweep's summary_layers, packed (storage._summary; v4); None
    # for a trial without counted target layers
    layer_counts: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)

    sweep: Mapped[SweepRow] = relationship(back_populates="trials")
    layers: Mapped[list[LayerRow]] = relationship(back_populates="trial", cascade="all, delete")


class LayerRow(Base):
    __tablename__ = "microsweep_layers"
    __table_args__ = (Index("ix_microsweep_layers_trial", "trial_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("microsweep_trials.id", ondelete="CASCADE"))
    layer: Mapped[str] = mapped_column(String(512))
    kind: Mapped[str] = mapped_column(String(64))
    sparsity: Mapped[float | None] = mapped_column(Float, nullable=True)
    bits: Mapped[int | None] = mapped_column(Integer, nullable=True)
    act_bits: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    params: Mapped[float] = mapped_column(Float)
    mask_bits: Mapped[float] = mapped_column(Float, default=0.0)
    mults: Mapped[float] = mapped_column(Float, default=0.0)
    adds: Mapped[float] = mapped_column(Float, default=0.0)
    others: Mapped[float] = mapped_column(Float, default=0.0)
    ops: Mapped[float] = mapped_column(Float)

    trial: Mapped[TrialRow] = relationship(back_populates="layers")


class SensitivityRow(Base):
    """One single-knob measurement: a layer with one knob at one level, everything else dense.

    Keyed by `eval_key` (model and data fingerprints plus every evaluation setting), so any
    sweep of the same model on the same windows reuses it; the dense model is the row with
    ``knob="dense"``. `nll` is the mean NLL per token (log perplexity).
    """

    __tablename__ = "microsweep_sensitivity"
    __table_args__ = (UniqueConstraint("eval_key", "layer", "knob", "level"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    eval_key: Mapped[str] = mapped_column(String(64), index=True)
    model_fingerprint: Mapped[str] = mapped_column(String(64))
    data_fingerprint: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(256))
    layer: Mapped[str] = mapped_column(String(512))
    knob: Mapped[str] = mapped_column(String(16))
    level: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    nll: Mapped[float] = mapped_column(Float)
    perplexity: Mapped[float] = mapped_column(Float)
    params: Mapped[float | None] = mapped_column(Float, nullable=True)
    ops: Mapped[float | None] = mapped_column(Float, nullable=True)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime)
