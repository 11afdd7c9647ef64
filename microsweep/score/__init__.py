"""MicroNet scoring: parameter and op counts by per-module rules, the score, and perplexity.

``count(model, context=...)`` walks the model with the registered rules (`register_rule` adds
one for a new layer type; microsweep's compressed layers register theirs from
`microsweep.compress`, and the helpers such rules share are public here); `micronet_score`
normalizes by a `Baseline`; `perplexity` measures a model on the fixed windows of
`eval_windows`, in batches that fit a memory limit (`batch_for_memory`); `kl_reference`
keeps the dense model's distributions on them, from which `window_nll_kl` measures a trial's
KL divergence beside its NLL.
"""

from microsweep.score._config import CountConfig
from microsweep.score._counter import (
    FREEBIE_BITS,
    Counts,
    LayerCount,
    count,
    storage_key,
    store_priority,
)
from microsweep.score._early_stop import ChunkVerdict, StopRule, subset_windows
from microsweep.score._formulas import (
    block_grid,
    block_pattern,
    linear_adds,
    mask_bits,
    mult_weight,
    op_weight,
    tensor_bits,
)
from microsweep.score._kl import (
    DEFAULT_TOP_K,
    FULL_VOCAB_MAX,
    KLReference,
    kl_reference,
    window_nll_kl,
)
from microsweep.score._perplexity import (
    DEFAULT_EVAL_MEMORY,
    batch_for_memory,
    eval_memory_limit,
    eval_windows,
    mean_context,
    nll_to_perplexity,
    perplexity,
    window_nll,
)
from microsweep.score._registry import (
    FLOAT_BITS,
    Cost,
    Rule,
    RuleContext,
    Stored,
    find_rule,
    register_rule,
    register_rules,
    rules_defined_in,
)
from microsweep.score._rounding import round_to_storage
from microsweep.score._rules import linear_ops, matvec
from microsweep.score._score import CHALLENGE_BASELINE, Baseline, micronet_score
from microsweep.score._trace import (
    UncountedWarning,
    UncountedWork,
    may_hide_work,
    uncounted_line,
    uncounted_work,
)

__all__ = [
    "CHALLENGE_BASELINE",
    "FLOAT_BITS",
    "FREEBIE_BITS",
    "Rule",
    "Stored",
    "block_grid",
    "block_pattern",
    "linear_ops",
    "matvec",
    "storage_key",
    "store_priority",
    "Baseline",
    "ChunkVerdict",
    "Cost",
    "CountConfig",
    "Counts",
    "LayerCount",
    "RuleContext",
    "UncountedWarning",
    "UncountedWork",
    "may_hide_work",
    "uncounted_line",
    "count",
    "eval_windows",
    "find_rule",
    "linear_adds",
    "mask_bits",
    "mean_context",
    "micronet_score",
    "mult_weight",
    "nll_to_perplexity",
    "op_weight",
    "perplexity",
    "register_rule",
    "register_rules",
    "rules_defined_in",
    "uncounted_work",
    "round_to_storage",
    "StopRule",
    "subset_windows",
    "tensor_bits",
    "window_nll",
    "window_nll_kl",
    "DEFAULT_TOP_K",
    "FULL_VOCAB_MAX",
    "KLReference",
    "kl_reference",
    "DEFAULT_EVAL_MEMORY",
    "batch_for_memory",
    "eval_memory_limit",
]
