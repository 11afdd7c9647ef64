"""Optuna's RDB rows for one trial, written inside a caller's transaction.

Optuna's `RDBStorage` commits once per parameter, attribute and value (one `suggest_*` is one
commit). A sweep instead samples against an in-memory study: a trial's row is reserved RUNNING
when it is dispatched (so numbers follow dispatch order and optuna-dashboard shows what runs),
and when it finishes everything else is written with a few bulk inserts in the same transaction
as microsweep's own rows, so the two stores change together. The rows are those Optuna writes
itself (same tables, value encodings and naive-UTC datetimes), so Optuna, optuna-dashboard and
resume read them as usual, with three changes that make what they show true:
- a float parameter is stored as its shortest decimal when it differs from that only by float
  rounding noise (a step grid's 0.30000000000000004 is stored as 0.3);
- a PRUNED trial's value is its score (the `score` user attribute): Optuna would store the last
  intermediate value, which here is a perplexity projection, in the score column;
- the legacy `constraints` list optuna-dashboard 0.21 reads beside Optuna 5's named constraint,
  with infinities written as the largest finite float, since the dashboard's JSON would carry
  `Infinity`, which browsers refuse to parse.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna.distributions import FloatDistribution
    from optuna.trial import FrozenTrial
    from sqlalchemy.orm import Session

__all__ = [
    "StaleTrialError",
    "clean_float",
    "finish_trial",
    "insert_rows",
    "reserve_trials",
]


class StaleTrialError(Exception):
    """The reserved trial was ended by someone else (another driver, or a resume)."""


def insert_rows(session: Session, table: Any, rows: list[dict[str, Any]]) -> None:
    """Insert `rows` (dicts with the same keys) into `table` in the session's transaction: by
    COPY on PostgreSQL with psycopg (a tenth of executemany's time there, which sends one
    statement per row), else by executemany (in-process and fast on SQLite)."""
    from sqlalchemy import insert

    if not rows:
        return
    connection = session.connection()
    if connection.dialect.name == "postgresql" and connection.dialect.driver == "psycopg":
        columns = list(rows[0])
        raw = connection.connection.dbapi_connection
        names = ", ".join(f'"{c}"' for c in columns)
        with raw.cursor() as cursor, cursor.copy(f'COPY "{table.name}" ({names}) FROM STDIN') as cp:
            for row in rows:
                cp.write_row([_plain(row[c]) for c in columns])
        return
    session.execute(insert(table), rows)


def _plain(value: Any) -> Any:
    """COPY sends what SQLAlchemy would bind: an enum member as its name."""
    return value.name if isinstance(value, enum.Enum) else value


@functools.lru_cache(maxsize=4096)
def _distribution_json(distribution: Any) -> str:
    """Optuna's JSON of a distribution; a space has few distinct ones, so each is made once."""
    from optuna.distributions import distribution_to_json

    return distribution_to_json(distribution)


def clean_float(value: float, distribution: FloatDistribution) -> float:
    """`value` as its shortest decimal (at most 12 significant digits) when the two differ only
    by float rounding noise (a few units in the last place of the distribution's scale) and the
    decimal still lies in `distribution`, on its step grid; otherwise `value` unchanged. Grid
    arithmetic gives 0.1 * 3 = 0.30000000000000004, stored as 0.3; a sampled
    0.5488135039273248, and any value on a log scale (a sample, never a grid point), is kept,
    since cutting its digits would change the value the trial ran with."""
    low, high, step = distribution.low, distribution.high, distribution.step
    if distribution.log or not math.isfinite(value):
        return value
    tolerance = 4 * math.ulp(max(abs(value), abs(low), abs(high)))
    for candidate in (0.0, *(float(f"{value:.{digits}g}") for digits in range(1, 13))):
        if abs(candidate - value) > tolerance:
            continue
        if candidate == value or not low <= candidate <= high:
            return value
        if step is not None:
            k = (candidate - low) / step
            if abs(k - round(k)) >= 1e-8:  # off the grid, by Optuna's own test
                return value
        return candidate
    return value


def _stored_param(distribution: Any, value: Any) -> float:
    """A parameter's internal representation, a float parameter cleaned of rounding noise."""
    from optuna.distributions import FloatDistribution

    if isinstance(distribution, FloatDistribution):
        value = clean_float(float(value), distribution)
    return distribution.to_internal_repr(value)


def _finite(value: float) -> float:
    """`value`, with an infinity (or NaN, which is never feasible) as the largest finite float
    of its sign, so strict JSON parsers accept it and feasibility (<= 0) is unchanged."""
    if math.isfinite(value):
        return value
    return -sys.float_info.max if value < 0 else sys.float_info.max


def _utc(value: datetime | None) -> datetime | None:
    """Optuna keeps trial datetimes as naive UTC; a FrozenTrial holds naive local time."""
    if value is None:
        return None
    return value.astimezone(UTC).replace(tzinfo=None)


def reserve_trials(session: Session, study_id: int, count: int) -> list[tuple[int, int]]:
    """Add `count` RUNNING trials to study `study_id` as Optuna's `create_new_trial` does
    (number = the study's trial count, study row locked on PostgreSQL); returns their
    (trial id, number)."""
    from optuna.trial import TrialState
    from sqlalchemy import func, insert, select

    from microsweep._optuna import rdb_models

    models = rdb_models()
    session.execute(
        select(models.StudyModel.study_id)
        .where(models.StudyModel.study_id == study_id)
        .with_for_update()
    )
    number = session.scalar(
        select(func.count(models.TrialModel.trial_id)).where(models.TrialModel.study_id == study_id)
    )
    out = []
    for k in range(count):
        trial_id = session.execute(
            insert(models.TrialModel.__table__).values(
                number=number + k,
                study_id=study_id,
                state=TrialState.RUNNING,
                datetime_start=_utc(datetime.now()),
            )
        ).inserted_primary_key[0]
        out.append((int(trial_id), int(number + k)))
    return out


def finish_trial(session: Session, trial_id: int, trial: FrozenTrial) -> None:
    """Write the finished `trial`'s parameters, values, intermediate values and attributes onto
    the reserved RUNNING trial `trial_id` and set its final state (with the module's three
    changes to Optuna's rows). Refuses (StaleTrialError) when the row is no longer RUNNING:
    someone else ended it, and its result must not be overwritten."""
    from optuna.trial import TrialState
    from sqlalchemy import update

    from microsweep._optuna import rdb_models

    models = rdb_models()
    if not trial.state.is_finished():
        raise ValueError(f"trial {trial.number} is {trial.state.name}, not finished")
    table = models.TrialModel.__table__
    changed = session.execute(
        update(table)
        .where(table.c.trial_id == trial_id, table.c.state == TrialState.RUNNING)
        .values(
            state=trial.state,
            datetime_start=_utc(trial.datetime_start),
            datetime_complete=_utc(trial.datetime_complete),
        )
    ).rowcount
    if changed != 1:
        raise StaleTrialError(f"Optuna trial id {trial_id} is no longer RUNNING")

    def bulk(model: Any, rows: list[dict[str, Any]]) -> None:
        insert_rows(session, model.__table__, rows)

    bulk(
        models.TrialParamModel,
        [
            {
                "trial_id": trial_id,
                "param_name": name,
                "param_value": _stored_param(trial.distributions[name], value),
                "distribution_json": _distribution_json(trial.distributions[name]),
            }
            for name, value in trial.params.items()
        ],
    )
    value_rows, inter_rows = _value_rows(models, trial_id, trial)
    bulk(models.TrialValueModel, value_rows)
    bulk(models.TrialIntermediateValueModel, inter_rows)
    system = dict(trial.system_attrs)
    named = [v for k, v in system.items() if k.startswith("constraints:")]
    if named and "constraints" not in system:
        # the list optuna-dashboard 0.21 reads for feasibility, in JSON a browser parses
        system["constraints"] = [_finite(float(v)) for v in named]
    for model, attrs in (
        (models.TrialUserAttributeModel, trial.user_attrs),
        (models.TrialSystemAttributeModel, system),
    ):
        bulk(
            model,
            [
                {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
                for k, v in attrs.items()
            ],
        )


def _value_rows(
    models: Any, trial_id: int, trial: FrozenTrial
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The trial's objective values (a PRUNED trial's value is its score) and its intermediate
    values, as rows of Optuna's two value tables in Optuna's stored representation."""
    from optuna.trial import TrialState

    values = trial.values or []
    score = trial.user_attrs.get("score")
    if trial.state == TrialState.PRUNED and len(values) == 1 and isinstance(score, (int, float)):
        values = [float(score)]  # not Optuna's last intermediate value: a perplexity here
    value_rows = []
    for objective, value in enumerate(values):
        stored, kind = models.TrialValueModel.value_to_stored_repr(value)
        value_rows.append(
            {"trial_id": trial_id, "objective": objective, "value": stored, "value_type": kind}
        )
    inter = models.TrialIntermediateValueModel
    inter_rows = []
    for step, value in trial.intermediate_values.items():
        stored, kind = inter.intermediate_value_to_stored_repr(value)
        inter_rows.append(
            {
                "trial_id": trial_id,
                "step": step,
                "intermediate_value": stored,
                "intermediate_value_type": kind,
            }
        )
    return value_rows, inter_rows
