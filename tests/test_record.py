"""Record file: AMCT files load, load(save(x)) == x, entries of other features survive, writes
are atomic."""
from __future__ import annotations

import numpy as np
import pytest

from slimq.errors import RecordError
from slimq.record import (ChannelPruneInfo, PruneNodeInfo, QuantFactors, Record, SelectiveMaskInfo,
                          pack_mask, read_record, unpack_mask, write_record)

AMCT_RECORD = """record {
  key: "conv1"
  value {
    scale_d: 0.0235
    offset_d: -128
    scale_w: 0.001
    scale_w: 0.002
    offset_w: 0
    offset_w: 0
    shift_bit: 7
    shift_bit: 8
    act_type: "INT8"
    wts_type: "INT8"
  }
}
record {
  key: "decoder.kv"
  kv_cache_value { scale: 0.5 offset: 1 }
}
prune_record {
  producer {
    name: "conv1"
    attr { name: "type" type: STRING s: "Conv2d" }
    attr { name: "begin" type: INT i: 0 }
    attr { name: "end" type: INT i: 4 }
    attr { name: "prune_index" type: INTS ints: 1 ints: 3 }
  }
  consumer {
    name: "conv2"
    attr { name: "type" type: STRING s: "Conv2d" }
    attr { name: "begin" type: INT i: 0 }
    attr { name: "end" type: INT i: 4 }
    attr { name: "prune_index" type: INTS ints: 1 ints: 3 }
  }
}
prune_record {
  selective_prune {
    name: "fc"
    attr { name: "mask_shape" type: INTS ints: 2 ints: 4 }
    attr { name: "selective_mask" type: INTS ints: 165 }
  }
}
"""


def test_amct_record_loads(tmp_path):
    p = tmp_path / "r.txt"
    p.write_text(AMCT_RECORD)
    rec = read_record(p)
    f = rec.quant("conv1")
    assert (f.scale_d, f.offset_d, f.shift_bit) == (pytest.approx(0.0235), -128, (7, 8))
    assert f.scale_w == (pytest.approx(0.001), pytest.approx(0.002))
    [group] = rec.channel_prunes()
    assert group.producers[0] == PruneNodeInfo("conv1", "Conv2d", 0, 4, (1, 3))
    masks = rec.selective_masks()
    assert masks["fc"].mask_shape == (2, 4)
    # 165 = 0b10100101 in the first byte, MSB first (AMCT's packbits layout)
    np.testing.assert_array_equal(masks["fc"].mask, [[1, 0, 1, 0], [0, 1, 0, 1]])


def test_round_trip_and_foreign_entries_survive(tmp_path):
    p = tmp_path / "r.txt"
    p.write_text(AMCT_RECORD)
    rec = read_record(p)
    rec.set_quant("conv2", QuantFactors(0.5, 3, (0.1,), (0,), (4,), "INT8", "INT4", fp16_scale=True))
    rec.set_channel_prunes([ChannelPruneInfo((PruneNodeInfo("a", "Linear", 0, 8, (2,)),),
                                             (PruneNodeInfo("b", "Linear", 8, 16, (10,)),))])
    write_record(p, rec)
    again = read_record(p)
    assert again == rec
    assert "kv_cache_value" in p.read_text()  # an entry slimq does not interpret is kept
    assert again.quant("conv2").wts_type == "INT4" and again.quant("conv2").fp16_scale
    assert again.selective_masks()["fc"].mask_shape == (2, 4)  # 2:4 entry kept by set_channel_prunes
    assert [g.producers[0].name for g in again.channel_prunes()] == ["a"]


def test_record_text_is_protobufs_short_repeated_text_format(tmp_path):
    """The fast printer of to_text writes exactly what MessageToString writes."""
    from google.protobuf import text_format

    p = tmp_path / "r.txt"
    p.write_text(AMCT_RECORD)
    rec = read_record(p)
    rec.set_quant("conv2", QuantFactors(0.1 + 1e-9, -7, (0.1, 3e-7, 2.5), (0, 0, 0), (4, 16, 1), "INT8", "INT8"))
    rec.set_channel_prunes([ChannelPruneInfo((PruneNodeInfo("a", "Conv2d", 0, 300, tuple(range(0, 300, 3))),),
                                             (PruneNodeInfo("b", "Conv2d", 0, 300, tuple(range(0, 300, 3))),))])
    rec.set_selective_mask(SelectiveMaskInfo("w", (8, 16), np.eye(8, 16, dtype=np.uint8)))
    expected = text_format.MessageToString(rec.message, as_utf8=True, use_short_repeated_primitives=True)
    assert "ints: [0, 3, 6, " in expected
    assert rec.to_text() == expected
    assert Record.from_text(rec.to_text()) == rec


@pytest.mark.parametrize("shape", [(3,), (5, 7), (16, 9, 3, 3), (1, 1)])
def test_mask_packing_round_trip(shape):
    mask = (np.random.default_rng(0).random(shape) > 0.5).astype(np.uint8)
    words = pack_mask(mask)
    assert len(words) == -(-int(np.prod(shape)) // 64)
    np.testing.assert_array_equal(unpack_mask(words, shape), mask)
    rec = Record()
    rec.set_selective_mask(SelectiveMaskInfo("w", shape, mask))
    np.testing.assert_array_equal(Record.from_text(rec.to_text()).selective_masks()["w"].mask, mask)


def test_bad_record_files(tmp_path):
    with pytest.raises(RecordError, match="does not exist"):
        read_record(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("record { key: 'x' value { scale_d: oops } }")
    with pytest.raises(RecordError, match="corrupt"):
        read_record(bad)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RecordError):
        read_record(binary)


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    p = tmp_path / "r.txt"
    rec = Record()
    rec.set_quant("a", QuantFactors(1.0, 0, (1.0,), (0,)))
    write_record(p, rec)
    before = p.read_text()

    import slimq._io as io_mod
    real_replace = io_mod.os.replace

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io_mod.os, "replace", boom)
    rec.set_quant("b", QuantFactors(2.0, 0, (1.0,), (0,)))
    with pytest.raises(OSError):
        write_record(p, rec)
    monkeypatch.setattr(io_mod.os, "replace", real_replace)
    assert p.read_text() == before
    assert [f.name for f in tmp_path.iterdir()] == ["r.txt"]  # temp file cleaned up


def test_write_into_missing_folder_is_a_record_error(tmp_path):
    with pytest.raises(RecordError, match="does not exist"):
        write_record(tmp_path / "no" / "r.txt", Record())
