"""Read back a W&B offline run file (`run-<id>.wandb`) in tests.

The file is a LevelDB-style log (a 7-byte file header, then 32 KiB blocks of records, each with a
7-byte header: crc32, length, type) of serialised `wandb_internal_pb2.Record` protobufs.
"""
import glob
import os
import struct

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < 7:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        else:
            break
        rec = pb.Record()
        rec.ParseFromString(pending)
        yield rec


def read_offline_run(run_dir):
    """{'group', 'tags', 'job_type', 'history_keys', 'config_keys', 'step_metrics'} of the newest offline
    W&B run under run_dir; step_metrics maps each define_metric name or glob to its x-axis metric."""
    files = sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb")))
    assert files, f"no offline W&B run under {run_dir}"
    out = {"group": None, "tags": [], "job_type": None, "history_keys": set(), "config_keys": set(),
           "step_metrics": {}}
    for rec in records(files[-1]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(group=rec.run.run_group, tags=list(rec.run.tags), job_type=rec.run.job_type)
            out["config_keys"] |= {i.key for i in rec.run.config.update}
        elif kind == "metric":
            name = rec.metric.name or rec.metric.glob_name
            step = rec.metric.step_metric
            if not step and rec.metric.step_metric_index:
                step = "#" + str(rec.metric.step_metric_index)
            out["step_metrics"].setdefault(name, step)
        elif kind == "history":
            out["history_keys"] |= {i.key or "/".join(i.nested_key) for i in rec.history.item}
    return out
