"""The record file: quantization factors and sparsity records, read, collected and written atomically."""
from .collector import RecordCollector, is_writer_rank
from .store import (OUTPUT_SUFFIX, ChannelPruneInfo, PruneNodeInfo, QuantFactors, Record, SelectiveMaskInfo,
                    pack_mask, read_record, unpack_mask, write_record)

__all__ = [
    "OUTPUT_SUFFIX", "ChannelPruneInfo", "PruneNodeInfo", "QuantFactors", "Record", "RecordCollector",
    "SelectiveMaskInfo", "is_writer_rank", "pack_mask", "read_record", "unpack_mask",
    "write_record",
]
