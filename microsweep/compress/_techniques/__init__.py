"""The technique registry: every way microsweep compresses a layer, one module each.

A technique (`Technique`, `_base.py`) names the `LayerPolicy` settings it reads, checks what a
Space rule (`check_rule`) or a policy (`check_layer`) asks of it, and builds the layer: a
`MatrixTechnique` changes one weight matrix on its way to a `CompressedLinear` (pruning,
quantization), a `RankTechnique` turns the layer into another module (factors, cores, codes).
The modules a technique produces are its `forms`: each form registers its counting rule with
`microsweep.score.register_rule` where it is defined and tells the exporter what the `.msz`
header stores for the module and how to rebuild it.

Adding a technique touches its own module here plus one registration line below (a new rank
method also gives its name and traits to `microsweep.policy.METHODS`, the vocabulary policies
are checked against). `compress_`, `VariantCache`, the Space checks and the exporter find it
through `technique(name)`, `techniques()` and `form_for(type)`.
"""

from ._act_quant import InputQuantization
from ._autoencoder import Autoencoder
from ._bands import FrequencyBands
from ._base import (
    Form,
    Given,
    GroupTechnique,
    LayerCheck,
    LayerShape,
    Matrix,
    MatrixTechnique,
    RankTechnique,
    RebuildContext,
    RuleCheck,
    SpecContext,
    Technique,
    form_for,
    form_of_spec,
    forms,
    register_technique,
    technique,
    techniques,
)
from ._block import BlockPruning
from ._data_aware import GPTQ, SparseGPT, Wanda
from ._magnitude import MagnitudePruning
from ._matrix import compress_matrix
from ._shared import SharedBasis
from ._svd import ActivationSVD, PlainSVD, WhitenSVD
from ._tensor_train import TensorTrain, tensor_train
from ._weight_quant import RoundToNearest

register_technique(MagnitudePruning())
register_technique(BlockPruning())
register_technique(RoundToNearest())
register_technique(InputQuantization())
register_technique(Wanda())
register_technique(SparseGPT())
register_technique(GPTQ())
register_technique(PlainSVD())
register_technique(ActivationSVD())
register_technique(WhitenSVD())
register_technique(TensorTrain())
register_technique(Autoencoder())
register_technique(SharedBasis())
register_technique(FrequencyBands())

__all__ = [
    "Form",
    "Given",
    "GroupTechnique",
    "LayerCheck",
    "LayerShape",
    "Matrix",
    "MatrixTechnique",
    "RankTechnique",
    "RebuildContext",
    "RuleCheck",
    "SpecContext",
    "Technique",
    "compress_matrix",
    "form_for",
    "form_of_spec",
    "forms",
    "register_technique",
    "technique",
    "techniques",
    "tensor_train",
]
