"""``scripts/bench.py --quick`` runs end to end, so the benchmark cannot rot between full runs.

Why in the suite: the full benchmark takes many minutes and is never run by tests; the quick mode
exercises every code path (key service, every mount, every workload, the load generator, the RSS
probe, cleanup) on small sizes and must leave no mount behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.kmsfs_mount_helpers import requires_fuse

pytestmark = [pytest.mark.integration, requires_fuse]

ROOT = Path(__file__).resolve().parents[2]
ROWS = {"seq_write", "seq_read", "rand_iops", "untar", "find_ls", "cat_all", "rm", "tar_diff",
        "kms_decrypt_rps", "kms_decrypt_p50", "kms_decrypt_p99", "kms_gdk_rps", "kms_gdk_p50",
        "kms_gdk_p99", "kms_serial_p50", "kms_serial_gdk_p50", "kms_serial_unix_p50",
        "kms_serial_unix_gdk_p50", "kmsfs_rss", "untar_floor", "cat_all_floor"}


def test_bench_quick_produces_every_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run_dir = tmp_path / "run"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick",
                           "--json-out", str(out), "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed < 60, f"--quick took {elapsed:.0f} s"
    result = json.loads(out.read_text())
    rows = {row["key"]: row for row in result["rows"]}
    assert set(rows) == ROWS
    for key, row in rows.items():
        if key == "rand_iops" and shutil.which("fio") is None:
            continue
        if key.endswith("_floor"):  # passthrough + one serial round trip per file
            assert row["values"]["floor"] > 0, key
            assert row["ratios"]["kmsfs/floor"] > 0, key
            continue
        assert row["values"].get("kmsfs") is not None, key
    # untar: the floor is the passthrough's time plus the round trips, so it exceeds the passthrough's
    assert rows["untar_floor"]["values"]["floor"] > rows["untar"]["values"]["passthrough"]
    assert rows["cat_all_floor"]["values"]["floor"] < rows["cat_all"]["values"]["passthrough"]
    assert result["cpu"]["untar"]["kmsfs"] > 0  # the daemon's CPU time per workload
    assert result["load_average"]["start"]
    for target in result["targets"]:
        assert rows["seq_write"]["values"][target] > 0
        assert rows["tar_diff"]["values"][target] == 0, f"tar -d differences on {target}"
    assert rows["kms_decrypt_rps"]["values"]["kmsfs"] > 0
    assert 0 < rows["kms_serial_p50"]["values"]["kmsfs"] < 1000
    assert 0 < rows["kms_serial_unix_p50"]["values"]["kmsfs"] < 1000  # the Unix-socket listener
    assert "kmsfs/gocryptfs" in proc.stdout and "kmsfs/floor" in proc.stdout
    assert "CPU seconds of each FUSE daemon" in proc.stdout
    with open("/proc/mounts", encoding="utf-8") as mounts:
        assert str(run_dir) not in mounts.read(), "bench left a mount behind"
    assert not run_dir.exists() or not any(run_dir.iterdir())
