"""`Store`: microsweep's tables and Optuna's RDB storage on one database URL.

One session helper commits or rolls back and turns database errors into `StorageError`. The
store keeps only its URL when pickled, so it can travel to another process. Each trial is
written in one transaction together with its per-layer rows and their summary per target layer
(`layer_counts`, what the report reads instead of the rows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from microsweep.errors import StorageError, StorageUnavailable
from microsweep.storage._url import masked, resolve_url, sqlite_path

if TYPE_CHECKING:
    import optuna
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session

    from microsweep.storage._models import SweepRow, TrialRow
    from microsweep.storage._records import TrialRecord

__all__ = ["Store"]

_KNOB_FIELDS = ("sparsity", "bits", "act_bits", "rank")
_COUNT_FIELDS = ("mask_bits", "mults", "adds", "others")


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Store:
    """The sweep database. `must_exist=True` refuses to create a new SQLite file and leaves the
    database as it is (read commands); `upgrade` (default: not `must_exist`) brings an older
    schema up to this release's."""

    def __init__(
        self, url: str | None = None, *, must_exist: bool = False, upgrade: bool | None = None
    ) -> None:
        self.url = resolve_url(url)
        self.display = masked(self.url)  # what messages show: no password
        self._must_exist = must_exist
        self._upgrade = (not must_exist) if upgrade is None else upgrade
        path = sqlite_path(self.url)
        if must_exist and path is not None and not path.is_file():
            raise StorageError(f"no sweep database at {path}; check --storage or run a sweep first")
        self._engine: Engine | None = None
        self._optuna: optuna.storages.RDBStorage | None = None
        self._summary_names: dict[int, list[str]] = {}  # sweep id -> its summary_layers

    def __getstate__(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "display": self.display,
            "_must_exist": self._must_exist,
            "_upgrade": self._upgrade,
            "_engine": None,
            "_optuna": None,
            "_summary_names": {},
        }

    # -- engine and schema ------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = self._make_engine()
            try:
                self._ensure_schema()
            except BaseException:  # refused (older, newer, foreign): never use it unchecked
                self._engine.dispose()
                self._engine = None
                raise
        return self._engine

    def _make_engine(self) -> Engine:
        from sqlalchemy import create_engine, event

        kwargs: dict[str, Any] = {}
        url = self.url
        if self.url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}
            url = self._read_only_url() or url
        else:
            kwargs["pool_pre_ping"] = True
        try:
            engine = create_engine(url, **kwargs)
        except Exception as exc:  # driver missing, bad options
            raise StorageError(f"cannot open storage {self.display}: {_one_line(exc)}") from None
        if self.url.startswith("sqlite"):

            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                if not self._must_exist:  # read commands leave the file's journal mode alone
                    cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

        return engine

    def _read_only_url(self) -> str | None:
        """For a read command on a SQLite file this process cannot write (read-only file or
        medium), a URL that opens it read-only: SQLite's default would try to create the WAL
        index beside it and fail. On a medium nothing can write, the file is opened immutable
        (no locks, no index). None when the file is writable or the store writes."""
        import os
        from urllib.parse import quote

        path = sqlite_path(self.url)
        if not self._must_exist or path is None or not path.is_file():
            return None
        if os.access(path, os.W_OK) and os.access(path.parent, os.W_OK):
            return None
        mode = "mode=ro" if os.access(path.parent, os.W_OK) else "mode=ro&immutable=1"
        return f"sqlite:///file:{quote(str(path.resolve()))}?{mode}&uri=true"

    def _has_schema(self) -> bool:
        """Whether microsweep's tables exist, looked up without creating a file, a table or
        changing the journal mode."""
        from sqlalchemy import create_engine, inspect
        from sqlalchemy.exc import SQLAlchemyError

        path = sqlite_path(self.url)
        if path is not None and not path.is_file():
            return False
        try:
            engine = create_engine(self._read_only_url() or self.url)
        except Exception as exc:  # driver missing, bad options
            raise StorageError(f"cannot open storage {self.display}: {_one_line(exc)}") from None
        try:
            return inspect(engine).has_table("microsweep_schema")
        except SQLAlchemyError as exc:
            kind = StorageUnavailable if _unavailable(exc) else StorageError
            raise kind(f"cannot use storage {self.display}: {_one_line(exc)}") from None
        finally:
            engine.dispose()

    def _ensure_schema(self) -> None:
        from sqlalchemy import inspect, select
        from sqlalchemy.exc import SQLAlchemyError

        from microsweep.storage._models import SCHEMA_VERSION, Base, SchemaRow

        assert self._engine is not None
        try:
            has_schema = inspect(self._engine).has_table("microsweep_schema")
            if not has_schema and self._must_exist:
                raise StorageError(
                    f"{self.display} holds no microsweep tables; check --storage or run a sweep "
                    "first"
                )
            if has_schema:
                with self.session() as s:
                    version = s.scalar(select(SchemaRow.version))
                if version is not None and version > SCHEMA_VERSION:
                    raise StorageError(
                        f"database schema version {version} is newer than this release reads "
                        f"({SCHEMA_VERSION}); upgrade microsweep"
                    )
                if version is not None and version < SCHEMA_VERSION:
                    if not self._upgrade:
                        raise StorageError(
                            f"database schema version {version} is older than this release's "
                            f"({SCHEMA_VERSION}); run 'microsweep upgrade --storage URL' first"
                        )
                    self._migrate(version)
            if not self._must_exist or self._upgrade:
                Base.metadata.create_all(self._engine)
            if not has_schema:
                with self.session() as s:
                    s.add(SchemaRow(id=1, version=SCHEMA_VERSION))
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot use storage {self.display}: {_one_line(exc)}") from None

    def _migrate(self, version: int) -> None:
        """Add the columns each later version brings (typed as the models declare them; one
        already there is kept), fill version 4's summaries from the layer rows, then record the
        new version, all in one transaction; a concurrent upgrade that got there first is
        accepted."""
        from sqlalchemy import inspect, select, text, update
        from sqlalchemy.exc import SQLAlchemyError

        from microsweep.storage._models import MIGRATIONS, SCHEMA_VERSION, Base, SchemaRow

        assert self._engine is not None
        try:
            with self._engine.begin() as conn:
                for step in range(version, SCHEMA_VERSION):
                    for table, column in MIGRATIONS[step]:
                        if any(c["name"] == column for c in inspect(conn).get_columns(table)):
                            continue
                        sql_type = Base.metadata.tables[table].c[column].type
                        conn.execute(
                            text(
                                f"ALTER TABLE {table} ADD COLUMN {column} "
                                f"{sql_type.compile(dialect=conn.dialect)}"
                            )
                        )
                if version <= 3:
                    _backfill_layer_counts(conn)
                conn.execute(update(SchemaRow).values(version=SCHEMA_VERSION))
        except SQLAlchemyError:
            with self._engine.connect() as conn:
                now = conn.execute(select(SchemaRow.version)).scalar()
            if now != SCHEMA_VERSION:
                raise

    def upgrade(self) -> tuple[int, int]:
        """Bring the schema to this release's; returns (version before, version now)."""
        from sqlalchemy import inspect, select
        from sqlalchemy.exc import SQLAlchemyError

        from microsweep.storage._models import SCHEMA_VERSION, SchemaRow

        engine = self._make_engine()
        try:
            if not inspect(engine).has_table("microsweep_schema"):
                raise StorageError(f"{self.display} holds no microsweep tables; nothing to upgrade")
            with engine.connect() as conn:
                before = int(conn.execute(select(SchemaRow.version)).scalar() or 0)
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot use storage {self.display}: {_one_line(exc)}") from None
        finally:
            engine.dispose()
        self._upgrade = True
        _ = self.engine  # migrates when older
        return before, SCHEMA_VERSION

    def schema_version(self) -> int:
        from sqlalchemy import select

        from microsweep.storage._models import SchemaRow

        with self.session() as s:
            return int(s.scalar(select(SchemaRow.version)) or 0)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """Commit on success, roll back on error, and report database errors in one line."""
        from sqlalchemy.exc import SQLAlchemyError
        from sqlalchemy.orm import Session

        session = Session(self.engine, expire_on_commit=False)
        try:
            yield session
            session.commit()
        except SQLAlchemyError as exc:
            session.rollback()
            kind = StorageUnavailable if _unavailable(exc) else StorageError
            raise kind(f"storage error on {self.display}: {_one_line(exc)}") from None
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def optuna_storage(self, cls: type | None = None) -> optuna.storages.RDBStorage:
        """Optuna's RDB storage on the same URL (created once per store); with `cls`, a new
        storage of that RDBStorage subclass (e.g. one that serves optuna-dashboard)."""
        if self._optuna is None or cls is not None:
            import optuna

            _ = self.engine  # WAL and schema first
            kwargs: dict[str, Any] = {}
            if self.url.startswith("sqlite"):
                kwargs = {"connect_args": {"timeout": 30}}
            else:
                kwargs = {"pool_pre_ping": True}
            make = cls or optuna.storages.RDBStorage
            for attempt in range(3):
                try:
                    made = make(self.url, engine_kwargs=kwargs)
                    if cls is not None:
                        return made
                    self._optuna = made
                    break
                except Exception as exc:
                    # two drivers creating Optuna's tables at once: the loser finds them made
                    if attempt < 2 and "already exists" in str(exc):
                        continue
                    raise StorageError(
                        f"cannot open Optuna storage on {self.display}: {_one_line(exc)}"
                    ) from None
        return self._optuna

    # -- sweeps -----------------------------------------------------------------------------
    def create_sweep(self, **fields: Any) -> SweepRow:
        """A new sweep row from its columns; `summary_layers` (the layers each trial's summary
        holds) defaults to those the space's rules name."""
        from sqlalchemy import select

        from microsweep.storage._models import SweepRow
        from microsweep.storage._summary import summary_layers

        if fields.get("summary_layers") is None:
            fields["summary_layers"] = summary_layers(fields.get("space_json"))

        with self.session() as s:
            if s.scalar(select(SweepRow.id).where(SweepRow.name == fields["name"])) is not None:
                raise StorageError(
                    f"a sweep named {fields['name']!r} already exists in {self.display}; "
                    "use 'microsweep resume' or another --name"
                )
            row = SweepRow(created_at=_now(), **fields)
            s.add(row)
        self._summary_names[row.id] = list(row.summary_layers)
        return row

    def get_sweep(self, name: str) -> SweepRow:
        from sqlalchemy import select

        from microsweep.storage._models import SweepRow

        with self.session() as s:
            row = s.scalar(select(SweepRow).where(SweepRow.name == name))
            if row is None:
                names = s.scalars(select(SweepRow.name).order_by(SweepRow.id)).all()
                known = f"; sweeps here: {', '.join(names)}" if names else "; it holds no sweeps"
                raise StorageError(f"no sweep named {name!r} in {self.display}{known}")
            return row

    def sweep_names(self) -> list[str]:
        """Names of the sweeps stored here, oldest first. A database without microsweep's
        tables answers [] and is left as it is (a run refused later leaves nothing behind)."""
        from sqlalchemy import select

        from microsweep.storage._models import SweepRow

        if self._engine is None and not self._must_exist and not self._has_schema():
            return []
        with self.session() as s:
            return list(s.scalars(select(SweepRow.name).order_by(SweepRow.id)))

    def delete_sweep(self, name: str) -> None:
        """Remove a sweep row and its trials (used to undo a sweep whose study failed to start)."""
        from sqlalchemy import select

        from microsweep.storage._models import SweepRow

        with self.session() as s:
            row = s.scalar(select(SweepRow).where(SweepRow.name == name))
            if row is not None:
                s.delete(row)
                self._summary_names.pop(row.id, None)  # the id may come back with another space

    def update_sweep(self, name: str, **fields: Any) -> None:
        from sqlalchemy import update

        from microsweep.storage._models import SweepRow

        with self.session() as s:
            s.execute(update(SweepRow).where(SweepRow.name == name).values(**fields))

    # -- ownership --------------------------------------------------------------------------
    def acquire_lease(
        self, name: str, owner: str, ttl: float, *, dead: str | None = None
    ) -> tuple[str, float] | None:
        """Make `owner` the driver of sweep `name` for `ttl` seconds if no live driver holds
        it (free, expired, already `owner`, or held by `dead`, a holder known to have exited);
        returns None on success, else the holder and the seconds since its lease was last
        renewed."""
        import time

        from sqlalchemy import or_, select, update

        from microsweep.storage._models import SweepRow

        now = time.time()
        with self.session() as s:
            taken = s.execute(
                update(SweepRow)
                .where(
                    SweepRow.name == name,
                    or_(
                        SweepRow.owner.is_(None),
                        SweepRow.lease_until < now,
                        SweepRow.owner == owner,
                        SweepRow.owner == (dead if dead is not None else owner),
                    ),
                )
                .values(owner=owner, lease_until=now + ttl)
            ).rowcount
            if taken == 1:
                return None
            holder, until = s.execute(
                select(SweepRow.owner, SweepRow.lease_until).where(SweepRow.name == name)
            ).one()
            return str(holder), max(0.0, now - ((until or now) - ttl))

    def renew_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Extend `owner`'s lease on sweep `name`; False when someone else holds it now."""
        import time

        from sqlalchemy import update

        from microsweep.storage._models import SweepRow

        with self.session() as s:
            return (
                s.execute(
                    update(SweepRow)
                    .where(SweepRow.name == name, SweepRow.owner == owner)
                    .values(lease_until=time.time() + ttl)
                ).rowcount
                == 1
            )

    def release_lease(self, name: str, owner: str) -> None:
        """Give sweep `name` up, if `owner` still holds it."""
        from sqlalchemy import update

        from microsweep.storage._models import SweepRow

        with self.session() as s:
            s.execute(
                update(SweepRow)
                .where(SweepRow.name == name, SweepRow.owner == owner)
                .values(owner=None, lease_until=None)
            )

    # -- trials -----------------------------------------------------------------------------
    def record_trial(
        self,
        sweep_id: int,
        record: TrialRecord,
        *,
        number: int | None = None,
        optuna_trial: tuple[int, tuple[int, int] | None, optuna.trial.FrozenTrial] | None = None,
        reserve: int = 0,
    ) -> list[tuple[int, int]]:
        """Write one finished trial (`record`: its columns and per-layer rows, and the rows'
        sums per target layer, `layer_counts`) in a single transaction.

        With `optuna_trial` (study id, the trial's reserved Optuna row as (trial id, number) or
        None to reserve it now, the finished in-memory trial), Optuna's rows are written in the
        same transaction, so both stores agree whatever fails, and the trial takes Optuna's
        number; `reserve` more RUNNING rows are reserved in it for trials about to start.
        Returns the trial's (Optuna trial id, number) (or (-1, number) without Optuna) followed
        by the reserved rows.
        """
        from sqlalchemy import insert

        from microsweep.storage._models import LayerRow, TrialRow
        from microsweep.storage._optuna_rows import reserve_trials
        from microsweep.storage._summary import pack_layer_counts

        with self.session() as s:
            out: list[tuple[int, int]] = [(-1, number if number is not None else -1)]
            if optuna_trial is not None:
                row, written = _finish_optuna_trial(s, sweep_id, optuna_trial)
                if written:  # a retried commit that had gone through
                    return [row]
                out = [row]
                number = row[1]
                if reserve:
                    out += reserve_trials(s, optuna_trial[0], reserve)
            if number is None:
                raise ValueError("record_trial needs a number or an Optuna trial")
            # Core inserts, not ORM objects: a trial's rows cost a few statements, not a flush
            columns = {**record.columns(), "policy": dict(record.policy)}
            columns["layer_counts"] = pack_layer_counts(
                self._summary_layers(s, sweep_id),
                ((lc["name"], lc["params"], lc["ops"]) for lc in record.layers),
            )
            trial_id = s.execute(
                insert(TrialRow.__table__).values(
                    sweep_id=sweep_id, number=number, finished_at=_now(), **columns
                )
            ).inserted_primary_key[0]
            _insert_layer_rows(s, LayerRow.__table__, trial_id, record.layers)
        return out

    def _summary_layers(self, s: Session, sweep_id: int) -> list[str]:
        """Sweep `sweep_id`'s `summary_layers` (read once per store; from its space for a row
        without them)."""
        from sqlalchemy import select

        from microsweep.storage._models import SweepRow
        from microsweep.storage._summary import summary_layers

        names = self._summary_names.get(sweep_id)
        if names is None:
            stored, space = s.execute(
                select(SweepRow.summary_layers, SweepRow.space_json).where(SweepRow.id == sweep_id)
            ).one()
            names = self._summary_names[sweep_id] = list(stored or summary_layers(space))
        return names

    def reserve_trials(self, study_id: int, count: int) -> list[tuple[int, int]]:
        """`count` new RUNNING trials in Optuna study `study_id`, as (trial id, number), in one
        commit."""
        from microsweep.storage._optuna_rows import reserve_trials

        with self.session() as s:
            return reserve_trials(s, study_id, count)

    def trials(self, name: str, *, with_layers: bool = False) -> list[TrialRow]:
        """Finished trials of a sweep in trial order. Each carries its counts per target layer
        (`layer_counts`, read by `storage.unpack_layer_counts` against the sweep's
        `summary_layers`); `with_layers` also loads every per-layer row (the full breakdown:
        kinds, knobs, raw counts), ~70 ORM objects per trial."""
        from sqlalchemy import select
        from sqlalchemy.orm import selectinload

        from microsweep.storage._models import SweepRow, TrialRow

        query = (
            select(TrialRow).join(SweepRow).where(SweepRow.name == name).order_by(TrialRow.number)
        )
        if with_layers:
            query = query.options(selectinload(TrialRow.layers))
        with self.session() as s:
            return list(s.scalars(query))

    def trial(self, name: str, number: int) -> TrialRow:
        from sqlalchemy import select
        from sqlalchemy.orm import selectinload

        from microsweep.storage._models import SweepRow, TrialRow

        with self.session() as s:
            row = s.scalar(
                select(TrialRow)
                .join(SweepRow)
                .where(SweepRow.name == name, TrialRow.number == number)
                .options(selectinload(TrialRow.layers))
            )
            if row is None:
                raise StorageError(f"sweep {name!r} has no finished trial {number}")
            return row

    # -- reads for reports ------------------------------------------------------------------
    def trial_rows_for_report(self, name: str) -> list[Any]:
        """The sweep's finished trials in trial order as plain rows (attribute access, no ORM
        objects): number, state, origin, reason, score, perplexity, params, ops, feasible,
        summary, policy, freebie and layer_counts (the packed counts per target layer), in one
        SELECT."""
        from sqlalchemy import select

        from microsweep.storage._models import SweepRow, TrialRow

        t = TrialRow
        query = (
            select(
                t.number,
                t.state,
                t.origin,
                t.reason,
                t.score,
                t.perplexity,
                t.params,
                t.ops,
                t.feasible,
                t.summary,
                t.policy,
                t.freebie,
                t.layer_counts,
            )  # fmt: skip
            .join(SweepRow, t.sweep_id == SweepRow.id)
            .where(SweepRow.name == name)
            .order_by(t.number)
        )
        with self.session() as s:
            return list(s.connection().execute(query))  # Core rows: no ORM loading

    # -- sensitivity ------------------------------------------------------------------------
    def sensitivity(self, eval_key: str) -> dict[tuple[str, str, str], float]:
        """Measured mean NLL per token by (layer, knob, level) for one evaluation key."""
        from sqlalchemy import select

        from microsweep.storage._models import SensitivityRow

        with self.session() as s:
            rows = s.execute(
                select(
                    SensitivityRow.layer,
                    SensitivityRow.knob,
                    SensitivityRow.level,
                    SensitivityRow.nll,
                ).where(SensitivityRow.eval_key == eval_key)
            ).all()
        return {(layer, knob, level): float(nll) for layer, knob, level, nll in rows}

    def sensitivity_rows(self, eval_key: str) -> list[Any]:
        """Every stored measurement of one evaluation key (for plots and reports)."""
        from sqlalchemy import select

        from microsweep.storage._models import SensitivityRow

        with self.session() as s:
            query = select(SensitivityRow).where(SensitivityRow.eval_key == eval_key)
            return list(s.scalars(query.order_by(SensitivityRow.id)))

    def record_sensitivity(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert measurements; one that another process stored meanwhile is kept as it is."""
        if not rows:
            return
        from microsweep.storage._models import SensitivityRow

        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        values = [{"created_at": _now(), **dict(r)} for r in rows]
        stmt = insert(SensitivityRow).values(values).on_conflict_do_nothing()
        with self.session() as s:
            s.execute(stmt)

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
        if self._optuna is not None:
            self._optuna.engine.dispose()


def _finish_optuna_trial(
    s: Session,
    sweep_id: int,
    optuna_trial: tuple[int, tuple[int, int] | None, optuna.trial.FrozenTrial],
) -> tuple[tuple[int, int], bool]:
    """Write a finished Optuna trial onto its reserved row (reserved now when None), in the
    caller's transaction; returns the row and whether this trial was stored already (a retried
    commit that had gone through). A row another driver ended is a `StorageError`."""
    from sqlalchemy import select

    from microsweep.storage._models import TrialRow
    from microsweep.storage._optuna_rows import StaleTrialError, finish_trial, reserve_trials

    study_id, row, frozen = optuna_trial
    if row is None:
        row = reserve_trials(s, study_id, 1)[0]
    try:
        finish_trial(s, row[0], frozen)
    except StaleTrialError:
        if s.scalar(
            select(TrialRow.id).where(TrialRow.sweep_id == sweep_id, TrialRow.number == row[1])
        ):
            return row, True
        raise StorageError(
            f"trial {row[1]} was ended by another driver of this sweep; its result is not stored"
        ) from None
    return row, False


def _insert_layer_rows(
    s: Session, table: Any, trial_id: int, layers: Sequence[Mapping[str, Any]]
) -> None:
    """One `microsweep_layers` row per counted layer of trial `trial_id` (the counter's rows:
    name, kind, params, ops, the knobs it reports and its raw counts)."""
    from microsweep.storage._optuna_rows import insert_rows

    rows = [
        {
            "trial_id": trial_id,
            "layer": lc["name"],
            "kind": lc["kind"],
            "params": lc["params"],
            "ops": lc["ops"],
            **{k: lc.get(k) for k in _KNOB_FIELDS},
            **{k: lc.get(k) or 0.0 for k in _COUNT_FIELDS},
        }
        for lc in layers
    ]
    insert_rows(s, table, rows)


def _backfill_layer_counts(conn: Any) -> None:
    """Fill every sweep's `summary_layers` and its trials' `layer_counts` from the stored layer
    rows (the upgrade to version 4): one read of the sweep's target rows and one batched update
    per sweep."""
    from collections import defaultdict

    from sqlalchemy import bindparam, select, update

    from microsweep.storage._models import LayerRow, SweepRow, TrialRow
    from microsweep.storage._summary import FACTORS, pack_layer_counts, summary_layers

    sweeps = conn.execute(select(SweepRow.id, SweepRow.space_json, SweepRow.summary_layers)).all()
    for sweep_id, space, stored in sweeps:
        names = list(stored or summary_layers(space))
        if stored is None:
            conn.execute(
                update(SweepRow).where(SweepRow.id == sweep_id).values(summary_layers=names)
            )
        if not names:
            continue
        wanted = [*names, *(f"{n}{part}" for n in names for part in FACTORS)]
        rows: dict[int, list[tuple[str, float, float]]] = defaultdict(list)
        query = (
            select(LayerRow.trial_id, LayerRow.layer, LayerRow.params, LayerRow.ops)
            .join(TrialRow, LayerRow.trial_id == TrialRow.id)
            .where(TrialRow.sweep_id == sweep_id, LayerRow.layer.in_(wanted))
        )
        for trial_id, layer, params, ops in conn.execute(query):
            rows[trial_id].append((layer, params, ops))
        if not rows:
            continue
        table = TrialRow.__table__
        conn.execute(
            update(table)
            .where(table.c.id == bindparam("trial"))
            .values(layer_counts=bindparam("counts")),
            [
                {"trial": trial_id, "counts": pack_layer_counts(names, layer_rows)}
                for trial_id, layer_rows in rows.items()
            ],
        )


def _one_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _unavailable(exc: BaseException) -> bool:
    """Whether a database error means 'not reachable or writable now' (retry) rather than a
    wrong statement or schema: connection refused or dropped, server restarting, a lock held
    too long, a full disk."""
    from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError

    if isinstance(exc, (OperationalError, InterfaceError, DisconnectionError)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
