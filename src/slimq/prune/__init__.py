"""Channel pruning: BalancedL2Norm selection, physical surgery, prune records.

Where channels are chosen: ``importance`` (scores, kept counts) and ``planner.decide``.
Where they are cut: ``surgery`` (one class per layer family) via ``planner.apply_records``.
"""
from .cost import layer_costs
from .importance import balanced_l2_scores, group_scores, kept_count, select_removed
from .planner import GroupDecision, PruneDecision, annotate_plan, apply_records, decide, to_records
from .surgery import SURGERY, is_depthwise, surgery_for

__all__ = [
    "GroupDecision", "PruneDecision", "SURGERY", "annotate_plan", "apply_records",
    "balanced_l2_scores", "decide", "group_scores", "is_depthwise", "kept_count", "layer_costs",
    "select_removed", "surgery_for", "to_records",
]
