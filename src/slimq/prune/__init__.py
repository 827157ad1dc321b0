"""Channel pruning: BalancedL2Norm selection, physical surgery, prune records.

Where channels are chosen: ``importance`` (scores, kept counts) and ``planner.decide``.
Where they are cut: ``surgery`` (by ``graph.members.channel_tensors``) via ``planner.apply_records``.
"""
from .cost import layer_costs
from .importance import balanced_l2_scores, group_scores, kept_count, select_removed
from .planner import GroupDecision, PruneDecision, annotate_plan, apply_records, decide, to_records
from .surgery import ATTRIBUTES, apply_keep, can_slice, is_depthwise

__all__ = [
    "ATTRIBUTES", "GroupDecision", "PruneDecision", "annotate_plan", "apply_keep", "apply_records",
    "balanced_l2_scores", "can_slice", "decide", "group_scores", "is_depthwise", "kept_count",
    "layer_costs", "select_removed", "to_records",
]
