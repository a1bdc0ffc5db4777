"""Runs the multi-device tests (8 host CPU devices) in a subprocess."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_sharded_on_eight_host_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["OPTAX_GC_MULTIDEVICE"] = "1"
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/multidevice/test_sharded.py",
        "tests/multidevice/test_shard_map.py",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    print(proc.stdout[-5000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out, num_processes):
    script = ROOT / "tests" / "multidevice" / "dp_train.py"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                "--process-id",
                str(i),
                "--num-processes",
                str(num_processes),
                "--port",
                str(port),
                "--out",
                str(out),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    return logs


def test_two_processes_match_one(tmp_path):
    """jax.distributed on 127.0.0.1: 2 processes x 2 CPU devices == 1 x 4."""
    import numpy as np

    _run_workers(tmp_path / "single.npz", 1)
    logs = _run_workers(tmp_path / "multi.npz", 2)
    assert all("final loss" in log for log in logs)
    with np.load(tmp_path / "single.npz") as a, np.load(tmp_path / "multi.npz") as b:
        assert sorted(a.files) == sorted(b.files) and len(a.files) == 12
        for k in a.files:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)
        kernels = [k for k in b.files if k.startswith("final/") and "kernel" in k]
        assert len(kernels) == 3
        for k in kernels:  # GC ran in the distributed step: unit means kept
            init, final = b["init/" + k[len("final/") :]], b[k]
            assert not np.allclose(init, final)
            fan_in = tuple(range(final.ndim - 1))
            np.testing.assert_allclose(
                final.mean(axis=fan_in), init.mean(axis=fan_in), atol=1e-6
            )
