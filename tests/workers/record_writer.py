"""Writes ever-new versions of a record file until killed (crash-safety test)."""
from __future__ import annotations

import sys

from slimq.record import ChannelPruneInfo, PruneNodeInfo, QuantFactors, Record, write_record


def main(path: str) -> None:
    version = 0
    while True:
        rec = Record()
        rec.set_quant("version", QuantFactors(float(version), 0, (1.0,), (0,)))
        big = tuple(range(version % 7, 20000, 3))  # a sizeable file: a wide window to be killed in
        rec.set_channel_prunes([ChannelPruneInfo((PruneNodeInfo("p", "Conv2d", 0, 20000, big),), ())])
        write_record(path, rec)
        print(version, flush=True)
        version += 1


if __name__ == "__main__":
    main(sys.argv[1])
