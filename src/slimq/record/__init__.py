"""The record file: quantization factors and sparsity records, read and written atomically."""
from .session import RecordSession, is_writer_rank
from .store import (ChannelPruneInfo, PruneNodeInfo, QuantFactors, Record, SelectiveMaskInfo,
                    pack_mask, read_record, unpack_mask, write_record)

__all__ = [
    "ChannelPruneInfo", "PruneNodeInfo", "QuantFactors", "Record", "RecordSession",
    "SelectiveMaskInfo", "is_writer_rank", "pack_mask", "read_record", "unpack_mask",
    "write_record",
]
