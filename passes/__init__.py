"""FX passes, one job each (``docs/design.md``, "Data flow")::

    trace        (passes/trace.py)         model -> GraphModule with tensor_meta
    find_units   (passes/find_units.py)    analysis: sums, op units, gated layers -> node.meta
    find_heads   (passes/find_heads.py)    analysis: attention heads as units -> node.meta
    insert_gates (passes/insert_gates.py)  transform: α/β/ω gate nodes + threshold parameters
    split_stages (passes/split_stages.py)  transform: gated graph -> resolution stages (multi-stage)
    skip_pruned_ops (passes/skip_pruned_ops.py)  transform: the live training graph (pruned ops dropped)
    fuse_kernels (passes/fuse_kernels.py)  transform: gated convs -> fused Triton op (CUDA only)
    fold_gates   (passes/fold_gates.py)    transform: gates after a BatchNorm -> its affine (training graph)
    export       (passes/export.py)        transform: gated graph -> compact plain GraphModule
    restore_norms (passes/restore_norms.py) transform: fresh BatchNorms where export folded them
    fold_norms   (passes/fold_norms.py)    transform: those norms folded back (after fine-tuning)
    retrain_graph (passes/retrain_graph.py) transform: drop-path and an auxiliary head (retraining)
    flatten_attention (passes/flatten_attention.py) transform: attention on 4-d q/k/v (before ONNX export)

``trace`` runs ``decompose_norm_act`` (passes/decompose.py) on timm's fused norm+act leaves,
``decompose_attention`` (same file) on self-attention ``nn.MultiheadAttention`` leaves,
and ``thread_inplace_ops`` (passes/inplace.py) so that readers after an in-place op read its
result.

Passes run through a ``PassManager`` with one shared check after each (``_manager.py``); the
pipelines the library runs, ``gate_pipeline`` (find_units -> find_heads -> insert_gates) and
``training_graph`` (skip_pruned_ops -> [stage_graph] -> fuse_kernels -> fold_gates), are in ``pipelines.py``.

``_graph.py`` classifies nodes by what they do to channels; ``_channels.py`` groups coupled
channels and finds constant ones. Both are shared by find_units and export.
"""

from granular.passes.export import Export, export_graph, plan_export
from granular.passes.find_heads import FindHeads, find_heads
from granular.passes.find_units import FindUnits, find_units
from granular.passes.fold_gates import FoldGates, fold_gates
from granular.passes.fold_norms import FoldNorms, fold_norms
from granular.passes.fuse_kernels import FuseKernels, fuse_kernels
from granular.passes.insert_gates import InsertGates, insert_gates
from granular.passes.pipelines import gate_pipeline, training_graph
from granular.passes.restore_norms import RestoreNorms, restore_norms
from granular.passes.retrain_graph import RetrainGraph, retrain_graph
from granular.passes.split_stages import SplitStages, split_stages
from granular.passes.trace import register_leaf_function, register_leaf_module, trace

__all__ = ["trace", "register_leaf_module", "register_leaf_function", "FindUnits", "find_units", "FindHeads", "find_heads",
           "InsertGates", "insert_gates", "FuseKernels", "fuse_kernels", "FoldGates", "fold_gates", "SplitStages", "split_stages", "Export", "export_graph", "plan_export",
           "RestoreNorms", "restore_norms", "FoldNorms", "fold_norms", "RetrainGraph", "retrain_graph", "gate_pipeline", "training_graph"]
