"""freeze_startup_objects in a child interpreter of its own (freezing pytest's heap would outlive the test)."""
import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import atexit, gc, json, weakref
    import torch  # a heap the size of a worker's start-up, roughly
    from partita.cluster.gc_freeze import freeze_startup_objects

    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.other, b.other = b, a
        return a

    report = {}
    atexit.register(lambda: print(json.dumps(report | {"frozen_at_exit": gc.get_freeze_count()})))
    garbage = weakref.ref(cycle())  # unreachable before the freeze: collected, not frozen
    kept = cycle()
    tracked_before = len(gc.get_objects())
    report["frozen"] = freeze_startup_objects()
    report["garbage_collected"] = garbage() is None
    report["kept_frozen"] = not any(o is kept for o in gc.get_objects())
    report["tracked_before"], report["tracked_after"] = tracked_before, len(gc.get_objects())
    later = weakref.ref(cycle())  # garbage made after the freeze is still collected
    gc.collect()
    report["later_collected"] = later() is None
    report["second_call"] = freeze_startup_objects()
""")


def test_freeze_leaves_startup_objects_out_of_collections_and_hands_them_back_at_exit():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["garbage_collected"] and report["later_collected"] and report["kept_frozen"]
    assert report["frozen"] >= report["tracked_before"] // 2 > 10_000
    assert report["tracked_after"] < report["tracked_before"] // 20
    assert report["second_call"] >= report["frozen"]
    assert report["frozen_at_exit"] == 0  # gc.unfreeze ran before the handler registered ahead of it
