"""`count_report`: the text of ``microsweep count SPACE.py [--policy policy.json]``.

It counts the space file's model exactly as a sweep trial does (the driver's context and count
settings, the same calibration windows for activation scales), so the table shows where a
trial's parameters and ops come from.
"""

from __future__ import annotations

from microsweep.errors import MicrosweepError, UsageError
from microsweep.score import CHALLENGE_BASELINE, Baseline, CountConfig, count, micronet_score

__all__ = ["count_report"]


def count_report(space_path: str, policy_path: str | None = None) -> str:
    """The per-layer count of the space file's model, dense or compressed by a policy file.

    The context is the driver's (`mean_context` of the objective's window, or the model's block
    size), the count options are the objective's `count`, and activation scales are calibrated
    on the same training windows a sweep uses. Recovery fine-tuning is not run: it moves weights
    but keeps every mask and grid, so the count is the same. Returns the table, its totals and
    settings, and the MicroNet score against the challenge baseline (and against the dense
    model when the objective's baseline is ``"dense"``). A bad policy file raises `UsageError`.
    """
    from microsweep.prepare import check_counted, load_space_file, prepare
    from microsweep.spaces import Policy

    # the policy file first: a bad one is refused before the space file builds its model
    policy = Policy.read(policy_path) if policy_path is not None else None
    sf = load_space_file(space_path, note_objective=False)  # nothing here uses a ceiling
    prepared = prepare(sf, seed=0)
    settings = prepared.settings
    config = CountConfig(**settings.count)
    model = sf.model
    title = f"{space_path}: dense model"
    if policy is not None:
        from microsweep.compress import compress

        try:
            model = compress(model, policy, calib=prepared.calib)
        except MicrosweepError as exc:
            raise UsageError(f"policy file {policy_path}: {str(exc).splitlines()[0]}") from None
        title = f"{space_path}: policy {policy_path}"
    counts = count(model, context=settings.context, config=config)
    if policy_path is None:
        check_counted(sf, prepared, counts.ops)  # no silent zero in the table
    score = micronet_score(counts.params, counts.ops)
    base = CHALLENGE_BASELINE
    lines = [
        title,
        counts.table(),
        f"params {counts.params:,.2f} (32-bit equivalents), ops {counts.ops:,.2f} per token",
        f"MicroNet score {score:.6g} against the challenge baseline "
        f"({base.params:,.0f} params, {base.ops:,.0f} ops)",
    ]
    if sf.objective.baseline == "dense" and policy_path is not None:
        dense = Baseline.from_counts(count(sf.model, context=settings.context, config=config))
        vs_dense = micronet_score(counts.params, counts.ops, dense)
        lines.append(
            f"MicroNet score {vs_dense:.6g} against the dense model "
            f"({dense.params:,.2f} params, {dense.ops:,.2f} ops)"
        )
    return "\n".join(lines)
