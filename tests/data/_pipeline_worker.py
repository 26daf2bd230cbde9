"""Subprocess worker for the resume and multi-process pipeline tests (not a test module)."""

import faulthandler
import hashlib
import json
import os
import signal
import sys

faulthandler.register(signal.SIGUSR1, all_threads=True)  # debugging aid for hangs
faulthandler.dump_traceback_later(90, exit=True)  # a hung worker prints its stacks and fails

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def batch_hash(b):
    h = hashlib.sha256()
    for k in sorted(b):
        h.update(k.encode())
        h.update(np.ascontiguousarray(b[k]).tobytes())
    return h.hexdigest()


def make(path, **kw):
    from starling_jax.data.pipeline import RankingPipeline, open_source

    src = open_source(path, "train", max_length=128)
    kw.setdefault("global_batch_size", 8)
    return RankingPipeline(src, num_answers=7, max_length=128, seed=3, bucket_window=4, **kw)


def main():
    cmd, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    if cmd == "save":  # iterate N batches, save state
        n = int(sys.argv[4])
        p = make(path, process_index=0, process_count=1)
        it = iter(p)
        for _ in range(n):
            next(it)
        json.dump(p.state(), open(out, "w"))
    elif cmd == "load":  # restore, print hash of next batch
        p = make(path, process_index=0, process_count=1)
        p.restore(json.load(open(out)))
        print("HASH", batch_hash(next(iter(p))))
    elif cmd == "straight":  # uninterrupted: hash of batch N (0-based)
        n = int(sys.argv[4])
        p = make(path, process_index=0, process_count=1)
        it = iter(p)
        for _ in range(n):
            next(it)
        print("HASH", batch_hash(next(it)))
    elif cmd == "multi":
        import jax

        pid, port = int(sys.argv[4]), int(sys.argv[5])
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.config.update("jax_num_cpu_devices", 1)
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
        assert jax.process_index() == pid and jax.process_count() == 2
        p = make(path)  # process index/count from jax
        rows, nb = [], 0
        for _ in range(p.num_batches_per_epoch):
            b = next(p)
            nb += 1
            rows += [int(r) for r in b["row"] if r >= 0]
        res = {"rows": rows, "batches": nb, "state": p.state()}
        # one global batch via to_global equals the single-process batch
        from jax.experimental import multihost_utils
        from jax.sharding import Mesh

        from starling_jax.data.pipeline import to_global

        mesh = Mesh(np.array(jax.devices()), ("data",))
        g = to_global(p.host_batch(0, 1), mesh)
        full = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in g.items()}
        single = make(path, process_index=0, process_count=1).host_batch(0, 1)
        res["global_shape"] = list(g["tokens"].shape)
        res["global_equal"] = all(np.array_equal(full[k], single[k]) for k in single)
        json.dump(res, open(out, "w"))
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
