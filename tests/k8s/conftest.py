"""Pytest fixtures for tests against a real Kubernetes control plane.

``k8s_cluster`` (session scope) starts etcd, kube-apiserver, kube-scheduler
and KWOK once per session (see ``harness.py`` and ``docs/k8s-testenv.md``).

Binaries come from ``scripts/k8s-testenv/build``'s cache.  When they are
missing the tests are skipped, unless ``COMPUTEGROUPS_REQUIRE_K8S=1`` (set by
CI via ``scripts/k8s-testenv/ci``): then the fixture builds them (or fails
loudly if that is impossible).  ``COMPUTEGROUPS_K8S_BUILD=1`` also allows an
on-demand build without making the tests mandatory.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from .harness import BinariesUnavailable, ControlPlane, find_binaries


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "k8s: needs the real Kubernetes control plane from scripts/k8s-testenv "
        "(etcd, kube-apiserver, kube-scheduler, kwok)",
    )


@pytest.fixture(scope="session")
def k8s_cluster() -> Iterator[ControlPlane]:
    """A running control plane; yields :class:`harness.ControlPlane`.

    Useful attributes: ``kubeconfig`` (admin), ``server``, ``admin_token``,
    ``ca_file``; helpers ``client()``, ``service_account_token(ns, name)``,
    ``service_account_kubeconfig(ns, name)``, ``make_gpu_node(...)``,
    ``ensure_namespace(name)``, ``ensure_gpu_device_class()``.
    """
    required = _truthy("COMPUTEGROUPS_REQUIRE_K8S")
    try:
        bin_dir = find_binaries(build=required or _truthy("COMPUTEGROUPS_K8S_BUILD"))
    except BinariesUnavailable as e:
        if required:
            pytest.fail(f"COMPUTEGROUPS_REQUIRE_K8S=1 but {e}", pytrace=False)
        pytest.skip(str(e))
    cp = ControlPlane.start(bin_dir)
    try:
        yield cp
    finally:
        leftovers_before = cp.leftover_processes()
        cp.stop(check=False)
        still = cp.leftover_processes()
        # Teardown errors are reported by pytest as errors of the last test.
        assert not still, f"control-plane processes survived teardown: {still}"
        assert all(p.popen.returncode is not None for p in cp.procs), (
            f"processes still running: {[p.name for p in cp.procs if p.popen.poll() is None]}"
            f" (before stop: {leftovers_before})"
        )


@pytest.fixture
def k8s_namespace(k8s_cluster: ControlPlane) -> str:
    """A fresh namespace per test (not deleted: no namespace controller runs)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    k8s_cluster.ensure_namespace(name)
    return name
