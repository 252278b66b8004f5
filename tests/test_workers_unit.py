"""Gateway workers without processes: budget shares, metrics ports, the child's argv, and the
Prometheus configuration that scrapes every worker (the processes: test_workers_e2e.py)."""

from __future__ import annotations

import sys

from ragserve_server.supervision import workers


def test_a_worker_takes_its_share_of_the_budgets_and_its_own_metrics_port():
    assert workers.share(512, 4) == 128 and workers.share(10, 4) == 3 and workers.share(1, 4) == 1
    assert workers.metrics_port(9000, 2) == 9002 and workers.metrics_port(0, 2) == 0
    argv = workers.child_argv(["--workers", "0", "--device", "gpu", "--port", "0"], 2, workers=3, port=50555, http_port=0, triton_url="127.0.0.1:8001")
    assert argv[:3] == [sys.executable, "-m", "ragserve_server"]
    from ragserve_server.main import with_workers_counted
    from ragserve_server.settings import Settings

    # The parent counted 3 (auto); the child, now given --triton-url, keeps the parent's count.
    settings = with_workers_counted(Settings.from_args(argv[3:], env={}))
    assert (settings.workers, settings.worker_index, settings.port, settings.triton_url) == (3, 2, 50555, "127.0.0.1:8001")


def test_auto_workers_leave_the_cores_the_model_needs():
    from ragserve_server.main import with_workers_counted
    from ragserve_server.settings import Settings

    assert workers.auto_count("cpu", bundled_triton=True, cores=16) == 1  # the model is computed on these cores
    assert workers.auto_count("cpu", bundled_triton=False, cores=16) == 1
    assert workers.auto_count("gpu", bundled_triton=True, cores=16) == 16 - workers.GPU_TRITON_CORES
    assert workers.auto_count("gpu", bundled_triton=False, cores=16) == 16
    assert workers.auto_count("gpu", bundled_triton=True, cores=2) == 1
    assert Settings.from_args([], env={}).workers == 0  # auto is the default
    assert with_workers_counted(Settings.from_args([], env={})).workers == 1  # on a CPU
    assert with_workers_counted(Settings.from_args(["--workers", "5"], env={})).workers == 5


def test_prometheus_config_scrapes_every_worker(tmp_path):
    import shutil
    import subprocess

    from support import ROOT

    out = tmp_path / "prometheus.yml"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "prometheus_config.py"), "--gateway", "127.0.0.1:9000", "--gateway-workers", "3", "--out", str(out)],
        check=True, capture_output=True,
    )
    assert '- targets: ["127.0.0.1:9000", "127.0.0.1:9001", "127.0.0.1:9002"]' in out.read_text()
    if shutil.which("promtool"):  # Debian's prometheus package brings it
        subprocess.run(["promtool", "check", "config", str(out)], check=True, capture_output=True)


def test_auto_workers_respect_a_cgroup_cpu_limit(tmp_path):
    """A Kubernetes CPU limit (cgroup quota) caps the count; the affinity alone would be every core of the node."""
    import os

    affinity = len(os.sched_getaffinity(0))
    assert workers.usable_cores(str(tmp_path)) == affinity  # no cgroup files: no limit
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert workers.usable_cores(str(tmp_path)) == affinity
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert workers.usable_cores(str(tmp_path)) == min(affinity, 2)
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1: 1 CPU
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert workers.usable_cores(str(tmp_path)) == 1

