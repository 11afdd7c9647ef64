"""Load a space file: a Python file defining `space`, and optionally `objective`, `corpus`,
`evaluate`, `calib` and `train_tokens`. Errors in the user's file come back as one line naming
the file and line, and a model that breaks the custom-model contract (README) is refused here,
before any trial, with the part that is missing."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from microsweep.errors import MicrosweepError, SpaceWarning, UsageError
from microsweep.prepare._objective import MicroNet
from microsweep.spaces import DATA_AWARE_METHODS, Space

__all__ = [
    "INLINE_PATH",
    "SpaceFile",
    "load_space_file",
    "load_space_source",
    "prepare_model",
    "space_from_objects",
]


@dataclass
class SpaceFile:
    """What a space file defines, plus its source text for provenance and resume."""

    path: str
    source: str
    module: ModuleType
    space: Space
    objective: MicroNet
    corpus: Any | None
    evaluate: Callable[[nn.Module], float] | None
    calib: torch.Tensor | None = None  # token ids (B, T) for input scales, without a corpus
    train_tokens: torch.Tensor | None = None  # 1-D ids for fine-tuning, without a corpus

    @property
    def model(self) -> nn.Module:
        """The space's model, prepared for compression by loading (`prepare_model`)."""
        return self.space.model


INLINE_PATH = "<python objects>"
"""The space path stored for a sweep defined by objects (no file to re-run on resume)."""


def space_from_objects(
    space: Space,
    *,
    objective: MicroNet | None = None,
    corpus: Any | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    calib: torch.Tensor | None = None,
    train_tokens: torch.Tensor | None = None,
) -> SpaceFile:
    """What a space file would define, given as Python objects (a notebook's `Space`, its
    objective and corpus), checked as a file's are."""
    if not isinstance(space, Space):
        raise UsageError(
            f"space must be a Space(model, rules=...) or the path of a space file, not "
            f"{type(space).__name__}"
        )
    name = f"microsweep_space_inline_{id(space):x}"
    module = ModuleType(name)
    module.__file__ = INLINE_PATH
    given = {
        "space": space,
        "objective": objective,
        "corpus": corpus,
        "evaluate": evaluate,
        "calib": calib,
        "train_tokens": train_tokens,
    }
    module.__dict__.update({k: v for k, v in given.items() if v is not None})
    sys.modules[name] = module
    return _collect(module, INLINE_PATH, "", space)


NO_OBJECTIVE_NOTE = (
    "no `objective` in this file: using MicroNet() — no perplexity ceiling, every trial is "
    "feasible; define objective = MicroNet(perplexity_ceiling=...) to set one"
)
"""The note `load_space_file` gives (as a `SpaceWarning` at the file's line 1) for a file
without `objective`: optional, but its default accepts any perplexity."""


def load_space_file(path: str | Path, *, note_objective: bool = True) -> SpaceFile:
    """Run the file at `path` and collect what it defines. Without `objective` the file means
    `MicroNet()`, which has no ceiling: with `note_objective` (a sweep) that is said once, as a
    `SpaceWarning`; `count`, which uses no ceiling, turns it off."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"space file {path} does not exist; pass the path of a .py file")
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read space file {path}: {exc}") from None
    sf = load_space_source(source, str(path))
    if note_objective and "objective" not in sf.module.__dict__:
        warnings.warn_explicit(NO_OBJECTIVE_NOTE, SpaceWarning, str(path), 1)
    return sf


def load_space_source(source: str, path: str) -> SpaceFile:
    """Run space-file `source` (as if it were the file at `path`) and collect its names."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    mod_name = f"microsweep_space_{digest}"
    spec = importlib.util.spec_from_loader(mod_name, loader=None, origin=path)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__file__ = path
    sys.modules[mod_name] = module
    # notes the space raises while the file runs are shown only if the file loads: an error
    # stays one line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SpaceWarning)
        try:
            code = compile(source, path, "exec")
            exec(code, module.__dict__)
        except MicrosweepError as exc:
            raise type(exc)(f"{path}: {exc}") from None
        except SyntaxError as exc:
            raise UsageError(
                f"space file {path} line {exc.lineno}: syntax error: {exc.msg}"
            ) from None
        except SystemExit as exc:  # sys.exit() in the file: say so instead of quitting silently
            raise UsageError(
                f"space file {path} called sys.exit({exc.code!r}) while loading; a space file "
                "must define `space` and return"
            ) from None
        except Exception as exc:
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
            line = f" line {frames[-1].lineno}" if frames else ""
            raise UsageError(f"space file {path}{line}: {type(exc).__name__}: {exc}") from None
    space = module.__dict__.get("space")
    if not isinstance(space, Space):
        raise UsageError(f"space file {path} must define `space = Space(model, rules=...)`")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return _collect(module, path, source, space)


def prepare_model(space: Space) -> nn.Module:
    """Make `space.model` ready to compress, in place, and return it: each `nn.LSTM` with a
    gate matrix some rule controls runs as a `LinearLSTM` sharing its parameters, so planning,
    counting, workers and fingerprints all see one Linear per gate matrix. An LSTM no rule
    touches stays an `nn.LSTM`; a model already prepared is left as it is."""
    from microsweep.models import linear_gates_

    owners = {i.name.rpartition(".")[0] for i in space.layers if i.kind == "lstm_gate"}
    if owners:
        linear_gates_(space.model, sorted(owners))
    return space.model


def _collect(module: ModuleType, path: str, source: str, space: Space) -> SpaceFile:
    """The objective, corpus and evaluate a loaded space file defines, checked, with the
    space's model prepared for compression (`prepare_model`) once the file is accepted."""
    where = "the space given as objects" if path == INLINE_PATH else f"space file {path}"
    objective = module.__dict__.get("objective", MicroNet())
    if not isinstance(objective, MicroNet):
        raise UsageError(f"{where}: `objective` must be a MicroNet(...), not {objective!r}")
    corpus = module.__dict__.get("corpus")
    evaluate = module.__dict__.get("evaluate")
    if evaluate is not None and not callable(evaluate):
        raise UsageError(f"{where}: `evaluate` must be a function model -> perplexity")
    if corpus is None and evaluate is None:
        raise UsageError(
            f"{where} must define `corpus` (e.g. data.tiny_shakespeare()) or "
            "`evaluate(model) -> perplexity`"
        )
    names = module.__dict__
    calib = _ids(names.get("calib"), 2, f"{where}: `calib`", "(B, T)")
    train = _ids(names.get("train_tokens"), 1, f"{where}: `train_tokens`", "(N,)")
    if corpus is None and calib is None:
        for rule in space.rules:
            method = getattr(rule.settings.get("rank"), "method", "plain")
            if method in DATA_AWARE_METHODS:
                raise UsageError(
                    f"{where}: rule {rule.key!r} factorizes with {method!r} SVD, which reads "
                    "the layers' inputs, but no calibration tokens are given; define `calib` "
                    "(token ids of shape (B, T)) or a `corpus`, or use Rank(..., method='plain')"
                )
            levels = getattr(rule.settings.get("act_bits"), "choices", ())
            if any(b < 32 for b in levels):
                raise UsageError(
                    f"{where}: rule {rule.key!r} quantizes layer inputs (act_bits) but "
                    "the file gives no calibration tokens; define `calib` (token ids of shape "
                    "(B, T)) or a `corpus`, or keep act_bits at 32"
                )
    if corpus is None and train is None and "finetune_steps" in space.hyper:
        raise UsageError(
            f"{where}: `finetune_steps` needs training tokens; define `train_tokens` "
            "(1-D token ids) or a `corpus`"
        )
    space.use_default_methods(calibrated=corpus is not None or calib is not None)
    prepare_model(space)
    # the counter traces a forward on token ids even when `evaluate` measures perplexity
    _check_forward(space.model, where, logits=evaluate is None)
    return SpaceFile(path, source, module, space, objective, corpus, evaluate, calib, train)


def _ids(value: Any, dims: int, what: str, shape: str) -> torch.Tensor | None:
    """A token-id tensor of `dims` dimensions, or None; anything else is refused."""
    if value is None:
        return None
    if (
        not isinstance(value, torch.Tensor)
        or value.dim() != dims
        or value.dtype.is_floating_point
        or value.dtype in (torch.bool, torch.complex64, torch.complex128)
        or value.numel() == 0
    ):
        got = (
            f"{value.dtype} {tuple(value.shape)}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise UsageError(f"{what} must be integer token ids of shape {shape}, got {got}")
    return value.to(torch.long)


def _check_forward(model: nn.Module, where: str, *, logits: bool = True) -> None:
    """The contract's input side, always (the counter traces the model on token ids, with or
    without `evaluate`): ids (B, T) in, checked once on two positions so that a wrong model
    fails here, in one line naming the module that raised, before any trace or trial. With
    `logits` (no `evaluate`: the built-in perplexity reads them), also the output side: logits
    (B, T, V), or an output holding them."""
    from microsweep.models import logits_of
    from microsweep.score._trace import forward_failure

    param = next(iter(model.parameters()), None)
    ids = torch.zeros(1, 2, dtype=torch.long, device=param.device if param is not None else None)
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            out = model(ids)
    except Exception as exc:
        raise UsageError(
            f"{where}: the model fails on token ids of shape (1, 2): "
            f"{forward_failure(model, exc)}; it must take ids (B, T), a LongTensor, since the "
            "counter runs it on them (with or without `evaluate`)"
        ) from None
    finally:
        for m, flag in flags:
            m.train(flag)
    if not logits:
        return
    out = logits_of(out)
    if not (isinstance(out, torch.Tensor) and out.dim() == 3 and tuple(out.shape[:2]) == (1, 2)):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(
            f"{where}: model(ids (1, 2)) gave {got}; the built-in perplexity needs "
            "logits (B, T, V) or an output with .logits; return them, or define `evaluate`"
        )
