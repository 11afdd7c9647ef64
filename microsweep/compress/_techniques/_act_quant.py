"""Activation (input) quantization: a layer's inputs rounded to `act_bits` with one static
scale, max|x| / (2^(b-1) - 1) calibrated on the unchanged model."""

from __future__ import annotations

from microsweep.policy import LayerPolicy

from ._base import LayerCheck, Matrix, MatrixTechnique, RuleCheck, check_inputs
from ._matrix import COMPRESSED

__all__ = ["InputQuantization"]


class InputQuantization(MatrixTechnique):
    """Fake-quantized inputs at ``act_bits`` (the `CompressedLinear` holds the input scale)."""

    name = "input_quantization"
    reads = ("act_bits",)
    forms = (COMPRESSED,)
    order = 2
    takes_tables = False

    def applies(self, settings: LayerPolicy) -> bool:
        """Input widths below 32 bits."""
        return settings.act_bits < 32

    def table_misfit(self, rule: RuleCheck) -> str | None:
        """A table's input is token ids: a rule that may quantize inputs does not fit it."""
        act = rule.settings.get("act_bits")
        if act is not None and any(b < 32 for b in getattr(act, "choices", ())):
            return "its input is token ids, so act_bits does not apply"
        return None

    def check_layer(self, layer: LayerCheck) -> None:
        """Tables have no input to quantize; the scale needs calibration tokens."""
        check_inputs(
            layer,
            f"layer {layer.name!r} quantizes its inputs (act_bits={layer.settings.act_bits}); "
            "pass calib=token ids of shape (B, T) to calibrate the input scale",
            on_table=f"layer {layer.name!r} is an embedding: its input is token ids, so "
            "act_bits does not apply; drop act_bits from its rule",
        )

    def apply(self, matrix: Matrix) -> None:
        """The input scale was calibrated on the unchanged model and travels in `matrix`."""
