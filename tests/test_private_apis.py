"""The private APIs of dependencies that the project still relies on exist, with the shape it relies on,
in the installed versions (docs/versions.md has the table and the upgrade procedure).

Run this first after changing the torch or Ray version (or any dependency)::

    .venv/bin/python -m pytest -q tests/test_private_apis.py

Each guard fails with a message naming the API, the file that uses it and what to do. ``REGISTRY`` lists
every private API in use; ``test_no_unregistered_private_api`` scans the code (core/, preprocessing/,
pipeline/, benchmarks/, scripts/, tests/) and fails on one that is not registered, so a new use cannot
slip in unguarded. A registered API that its files no longer use makes its guard skip, saying so.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import io
import os
import pickle
import socket
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass
from datetime import timedelta
from enum import Enum
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("core", "preprocessing", "pipeline", "benchmarks", "scripts", "tests")
PROJECT_PACKAGES = set(SCANNED)
THIS_FILE = Path(__file__).resolve()
# Top-level modules whose dotted names in string constants count as library references.
LIBRARY_ROOTS = {
    "torch", "torchvision", "ray", "omegaconf", "pyarrow", "webdataset", "mlflow", "decord", "fsspec", "s3fs",
    "av", "numpy", "PIL", "safetensors", "botocore", "boto3", "moto", "psutil", "pathlib", "argparse", "pickle",
}  # fmt: skip


@dataclass(frozen=True)
class PrivateApi:
    api: str  # what is used, as it reads in the code
    library: str
    where: tuple[str, ...]  # files (relative to the repository root) that use it
    marker: str  # text that appears in those files while they use it
    todo: str  # what to do when the guard fails
    scan: tuple[str, ...] = ()  # the names test_no_unregistered_private_api reports for it


REGISTRY = {
    "ray-single-machine-mode": PrivateApi(
        "ray._private.ray_constants.ENABLE_RAY_CLUSTER and the env variable RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
        "ray", ("core/loopback.py",), "ray._private.ray_constants",
        "find how this Ray version keeps a single-machine node (GCS, raylet, agents, workers) on 127.0.0.1 "
        "(ray/_private/services.py get_node_ip_address), update core.loopback.keep_ray_on_loopback, then run "
        "tests/reliability/test_security.py -k loopback",
        scan=("ray._private.ray_constants",),
    ),
    "ray-torch-backend": PrivateApi(
        "ray.train.torch.config._TorchBackend (subclassed; on_start(worker_group, backend_config) and "
        "worker_group.execute)", "ray", ("pipeline/trainer/distributed.py",), "_TorchBackend",
        "find the class TorchConfig.backend_cls returns and how Ray Train calls it before init_process_group, "
        "update _LoopbackTorchBackend, then run tests/reliability/test_security.py -k training_job",
        scan=("ray.train.torch.config._TorchBackend",),
    ),
    "torch-create-c10d-store": PrivateApi(
        "torch.distributed.rendezvous._create_c10d_store (wrapped) and _agent_store_serves (read)", "torch",
        ("pipeline/trainer/distributed.py",), "_create_c10d_store",
        "find where torch's env:// and tcp:// rendezvous create their TCPStore now and update "
        "bind_torch_store_to_loopback, then run tests/reliability/test_security.py -k training_job",
        scan=("torch.distributed.rendezvous._create_c10d_store", "torch.distributed.rendezvous._agent_store_serves"),
    ),
    "torch-dcp-metadata-globals": PrivateApi(
        "torch.serialization._get_layout, torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING, "
        "torch.distributed.checkpoint.filesystem._StorageInfo (globals DCP's .metadata pickle names)", "torch",
        ("pipeline/trainer/checkpoint.py",), "_DCP_METADATA_GLOBALS",
        "compare the globals DCP's .metadata now names with _DCP_METADATA_GLOBALS; add only plain data classes "
        "(never a callable that runs code), then run tests/train/test_checkpoint.py and "
        "tests/reliability/test_security.py -k dcp",
        scan=("torch.serialization._get_layout", "torch.distributed.checkpoint.filesystem._StorageInfo"),
    ),
    "pathlib-local": PrivateApi(
        "pathlib._local.PosixPath / WindowsPath (Python 3.13 pickles Path objects under this name)", "python",
        ("pipeline/trainer/checkpoint.py",), "pathlib._local",
        "add the module the running Python pickles pathlib.Path classes under to _DCP_METADATA_GLOBALS",
        scan=("pathlib._local.PosixPath", "pathlib._local.WindowsPath"),
    ),
    "torch-filesystem-reader": PrivateApi(
        "torch.distributed.checkpoint.FileSystemReader._get_metadata_path (with .fs.create_stream, .load_id)",
        "torch", ("pipeline/trainer/checkpoint.py",), "_get_metadata_path",
        "compare torch's FileSystemReader.read_metadata with SafeFileSystemReader.read_metadata (it mirrors the "
        "stock one with the unpickler swapped) and update it, then run tests/train/test_checkpoint.py",
        scan=("torch.distributed.checkpoint.FileSystemReader._get_metadata_path",),
    ),
    "decord-device-api-registry": PrivateApi(
        '"device_api.gpu" in decord.list_global_func_names() (the runtime\'s registry naming)', "decord",
        ("pipeline/data/decode.py",), "device_api.gpu",
        "find how this Decord build tells whether its CUDA device API is compiled in; update "
        "pipeline.data.decode.decord_has_cuda, then run tests/data/test_decode.py",
    ),
    "ray-current-cluster-file": PrivateApi(
        "/tmp/ray/ray_current_cluster (Ray's record of the last head started here)", "ray",
        ("pipeline/local_cluster.py",), "ray_current_cluster",
        "find where this Ray version records the latest local cluster and update LocalCluster.stop, then run "
        "tests/reliability/test_security.py -k local_ray_cluster",
    ),
    "ray-job-agent-not-ready-text": PrivateApi(
        '"No available agent to submit job" (dashboard reply text)', "ray", ("pipeline/local_cluster.py", "pipeline/netns_cluster.py"),
        "AGENT_NOT_READY",
        "find the reply ray job submit gets while the head's job agent is not registered yet and update "
        "AGENT_NOT_READY, then run scripts/demo.sh or tests/train/test_submit.py",
    ),
    "ray-train-health-check-text": PrivateApi(
        "the text of Ray Train's WorkerHealthCheckFailedError (its health_check_failure attribute and the "
        "worker's ActorMetadata repr: node_ip='...', node_id='...')", "ray", ("pipeline/trainer/job.py",),
        "_WORKER_NODE_IP",
        "find how Ray Train now describes a worker whose health check failed (ray/train/v2/_internal/exceptions.py, "
        "execution/worker_group/worker.py) and update _lost_worker_node, then run "
        "tests/cluster/test_node_loss.py -k fixed_size",
        scan=("ray.train.v2._internal.exceptions", "ray.train.v2._internal.execution.worker_group.worker"),
    ),
    "argparse-subparsers-action": PrivateApi(
        "argparse._SubParsersAction (type annotations only, never evaluated)", "python",
        ("preprocessing/cli.py",), "_SubParsersAction",
        "annotate with the type ArgumentParser.add_subparsers() returns in this Python",
        scan=("argparse._SubParsersAction",),
    ),
    # -- used by tests only ------------------------------------------------------------------------------
    "torch-save-legacy-format": PrivateApi(
        "torch.save(..., _use_new_zipfile_serialization=False) (writes the legacy, non-zip format)", "torch",
        ("tests/reliability/test_security.py",), "_use_new_zipfile_serialization",
        "find how this torch writes its legacy format, or drop the 'legacy' case if torch no longer loads it",
        scan=("torch.save(_use_new_zipfile_serialization)",),
    ),
}


# -- guards --------------------------------------------------------------------------------------------------

def _fail(key: str, problem: str) -> None:
    entry = REGISTRY[key]
    pytest.fail(
        f"private API {entry.api} ({entry.library}), used in {', '.join(entry.where)}, changed: {problem}\n"
        f"What to do: {entry.todo}. Then update its row in docs/versions.md and the version bounds in "
        f"pyproject.toml.",
        pytrace=False,
    )


@contextmanager
def guard(key: str) -> Iterator[None]:
    """Runs a guard's checks, turning any failure into a message that names the API and what to do."""
    entry = REGISTRY[key]
    if not any(entry.marker in _code(f) for f in entry.where):
        pytest.skip(f"{entry.api} is no longer used in {', '.join(entry.where)}: remove it from REGISTRY, "
                    f"docs/versions.md and (if nothing else needs it) its bound in pyproject.toml")
    try:
        yield
    except (AssertionError, ImportError, AttributeError, TypeError, ValueError, KeyError, OSError,
            subprocess.SubprocessError, pickle.UnpicklingError) as err:
        _fail(key, f"{type(err).__name__}: {err}")


def _code(relative: str) -> str:
    path = ROOT / relative
    return path.read_text() if path.is_file() else ""


def _params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _globals_used(fn: object) -> set[str]:
    """The global and attribute names a function's own code refers to."""
    return set(inspect.unwrap(fn).__code__.co_names)


def test_ray_single_machine_mode_keeps_the_node_on_loopback() -> None:
    from core.loopback import LOOPBACK_ENV

    with guard("ray-single-machine-mode"):
        constants = importlib.import_module("ray._private.ray_constants")
        assert constants.ENABLE_RAY_CLUSTERS_ENV_VAR in LOOPBACK_ENV, \
            f"the switch is now {constants.ENABLE_RAY_CLUSTERS_ENV_VAR}, not {sorted(LOOPBACK_ENV)}"
        assert isinstance(constants.ENABLE_RAY_CLUSTER, bool), "ENABLE_RAY_CLUSTER is no longer a bool"
        services = importlib.import_module("ray._private.services")
        assert "ENABLE_RAY_CLUSTER" in _globals_used(services.get_node_ip_address), \
            "ray._private.services.get_node_ip_address no longer reads ENABLE_RAY_CLUSTER"
        # In a fresh interpreter: the variable set before Ray is imported, and keep_ray_on_loopback() after.
        probe = (
            "import os, sys, ray, ray.util, ray._private.ray_constants as c\n"
            "from core.loopback import LOOPBACK_ENV, keep_ray_on_loopback\n"
            "before = c.ENABLE_RAY_CLUSTER\n"
            "keep_ray_on_loopback()\n"
            "print(before, c.ENABLE_RAY_CLUSTER, ray.util.get_node_ip_address())\n"
        )
        env = {k: v for k, v in os.environ.items() if k not in LOOPBACK_ENV and k != "RAY_ADDRESS"}
        for preset in ({}, LOOPBACK_ENV):
            out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**env, **preset}, capture_output=True,
                                 text=True, timeout=120)
            assert out.returncode == 0, out.stderr[-2000:]
            before, after, address = out.stdout.split()[-3:]
            if preset:
                assert before == "False", f"{sorted(preset)} set before `import ray` left ENABLE_RAY_CLUSTER on"
            assert after == "False", "keep_ray_on_loopback() left ENABLE_RAY_CLUSTER on"
            assert address in ("127.0.0.1", "::1"), f"node address {address}, not loopback, in single-machine mode"


def test_ray_train_torch_backend_can_be_extended() -> None:
    from pipeline.trainer.distributed import LoopbackTorchConfig, _LoopbackTorchBackend

    with guard("ray-torch-backend"):
        from ray.train.backend import Backend
        from ray.train.torch import TorchConfig
        from ray.train.torch.config import _TorchBackend

        assert TorchConfig().backend_cls is _TorchBackend, \
            f"TorchConfig.backend_cls is now {TorchConfig().backend_cls!r}, not _TorchBackend"
        assert issubclass(_TorchBackend, Backend), "_TorchBackend is no longer a ray.train.backend.Backend"
        assert _params(_TorchBackend.on_start) == ["self", "worker_group", "backend_config"], \
            f"_TorchBackend.on_start takes {_params(_TorchBackend.on_start)}"
        assert issubclass(LoopbackTorchConfig().backend_cls, _TorchBackend)
        assert _LoopbackTorchBackend.on_start is not _TorchBackend.on_start
        # Ray Train (v2) calls backend_cls().on_start(group, config) before the training function, with a
        # group whose execute(fn) runs fn on every worker.
        setup = importlib.import_module("ray.train.v2._internal.callbacks.backend_setup").BackendSetupCallback
        assert "backend_cls" in _globals_used(setup.__init__), "Ray Train no longer instantiates backend_cls"
        assert "on_start" in _globals_used(setup.after_execution_group_start), \
            "Ray Train no longer calls Backend.on_start when the worker group starts"
        from ray.train._internal.base_worker_group import BaseWorkerGroup

        group = importlib.import_module("ray.train.v2._internal.execution.worker_group").ExecutionGroup
        assert issubclass(group, BaseWorkerGroup), "the worker group is no longer a BaseWorkerGroup"
        for cls in (BaseWorkerGroup, group):
            first = list(inspect.signature(cls.execute).parameters.values())[1]
            assert first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD), \
                f"{cls.__name__}.execute no longer takes the function first: {_params(cls.execute)}"
        assert "execute" in _globals_used(_LoopbackTorchBackend.on_start)


def test_torch_rendezvous_store_creation_can_be_bound_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    from pipeline.trainer import distributed

    with guard("torch-create-c10d-store"):
        rendezvous = importlib.import_module("torch.distributed.rendezvous")
        create = rendezvous._create_c10d_store
        assert _params(inspect.unwrap(create)) == ["hostname", "port", "rank", "world_size", "timeout", "use_libuv"], \
            f"_create_c10d_store takes {_params(create)}"
        for handler in ("_env_rendezvous_handler", "_tcp_rendezvous_handler"):
            assert "_create_c10d_store" in _globals_used(getattr(rendezvous, handler)), \
                f"{handler} no longer creates its store through the module's _create_c10d_store"
        assert _params(rendezvous._agent_store_serves) == ["hostname", "port"], \
            f"_agent_store_serves takes {_params(rendezvous._agent_store_serves)}"

        # The real thing: patched, a store created on 127.0.0.1 listens on loopback only.
        monkeypatch.setattr(rendezvous, "_create_c10d_store", create)  # restored after the test
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "unset")
        monkeypatch.delenv("GLOO_SOCKET_IFNAME")  # so the value the patch sets is removed afterwards
        monkeypatch.setattr(distributed, "_loopback_stores", [])
        distributed.bind_torch_store_to_loopback()
        assert getattr(rendezvous._create_c10d_store, "_mvit_loopback", False), "the patch did not apply"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        store = rendezvous._create_c10d_store("127.0.0.1", port, 0, 1, timedelta(seconds=30))
        try:
            store.set("probe", "1")
            assert store.get("probe") == b"1"
            process = psutil.Process()
            connections = getattr(process, "net_connections", None) or process.connections
            listening = [c.laddr.ip for c in connections("inet")
                         if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
            assert listening, f"nothing listens on port {port}"
            exposed = [ip for ip in listening if ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
            assert not exposed, f"the store listens on {exposed}"
        finally:
            del store
            for sock, _ in distributed._loopback_stores:
                sock.close()


def _dcp_metadata_file(tmp_path: Path) -> Path:
    """A DCP checkpoint of a model and its optimiser (tensors and plain values) written by this torch."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    return tmp_path / ".metadata"


def test_dcp_metadata_names_only_allowlisted_globals(tmp_path: Path) -> None:
    import torch

    from pipeline.trainer.checkpoint import _DCP_METADATA_GLOBALS, SafeFileSystemReader

    with guard("torch-dcp-metadata-globals"):
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING
        from torch.serialization import _get_layout

        assert _params(_get_layout) == ["name"], f"_get_layout takes {_params(_get_layout)}"
        assert _get_layout("torch.strided") is torch.strided, "_get_layout no longer maps names to layouts"
        assert issubclass(_MEM_FORMAT_ENCODING, Enum), "_MEM_FORMAT_ENCODING is no longer an Enum"
        assert is_dataclass(_StorageInfo), "_StorageInfo is no longer a dataclass"
        assert {"relative_path", "offset", "length"} <= {f.name for f in fields(_StorageInfo)}, \
            f"_StorageInfo has fields {[f.name for f in fields(_StorageInfo)]}"
        for module, name in sorted(_DCP_METADATA_GLOBALS):
            if module.startswith("pathlib"):
                continue  # Python's own, checked by the pathlib guard
            assert hasattr(importlib.import_module(module), name), f"{module}.{name} is gone"

        named: set[tuple[str, str]] = set()

        class Recording(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> object:
                named.add((module, name))
                return super().find_class(module, name)

        metadata = _dcp_metadata_file(tmp_path)
        with open(metadata, "rb") as f:
            Recording(f).load()
        dtypes = {(m, n) for m, n in named if m == "torch" and isinstance(getattr(torch, n, None), torch.dtype)}
        unknown = sorted(named - _DCP_METADATA_GLOBALS - dtypes)
        assert not unknown, f"DCP metadata written by torch {torch.__version__} names {unknown}, not allowlisted"
        SafeFileSystemReader(str(tmp_path)).read_metadata()  # and the safe reader loads it


def test_pathlib_classes_pickle_under_an_allowlisted_module() -> None:
    from pipeline.trainer.checkpoint import _DCP_METADATA_GLOBALS

    with guard("pathlib-local"):
        named: set[tuple[str, str]] = set()

        class Recording(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> object:
                named.add((module, name))
                return super().find_class(module, name)

        Recording(io.BytesIO(pickle.dumps(Path("/x")))).load()
        assert named and named <= _DCP_METADATA_GLOBALS, \
            f"Python {sys.version_info[0]}.{sys.version_info[1]} pickles a Path as {sorted(named)}, not allowlisted"


def test_dcp_filesystem_reader_internals(tmp_path: Path) -> None:
    with guard("torch-filesystem-reader"):
        from torch.distributed.checkpoint import FileSystemReader

        assert "rank" in _params(FileSystemReader._get_metadata_path), \
            f"_get_metadata_path takes {_params(FileSystemReader._get_metadata_path)}"
        reader = FileSystemReader(str(tmp_path))
        assert str(reader._get_metadata_path()).endswith(".metadata")
        assert str(reader._get_metadata_path(rank=0)).endswith("__0.metadata")
        assert callable(reader.fs.create_stream), "FileSystemReader.fs has no create_stream"
        assert isinstance(reader.load_id, str), "FileSystemReader has no load_id"
        stock = _globals_used(FileSystemReader.read_metadata)
        missing = {"_get_metadata_path", "create_stream", "pickle", "storage_meta", "load_id"} - stock
        assert not missing, f"the stock read_metadata that SafeFileSystemReader mirrors changed (no {sorted(missing)})"


def test_decord_registers_one_function_per_device_api() -> None:
    from pipeline.data.decode import decord_has_cuda, load_decord

    with guard("decord-device-api-registry"):
        names = load_decord().list_global_func_names()
        assert "device_api.cpu" in names, \
            f"no device_api.cpu among Decord's registered functions: {sorted(n for n in names if 'device' in n)}"
        assert decord_has_cuda() == ("device_api.gpu" in names)


def test_ray_records_the_current_cluster_where_local_cluster_looks() -> None:
    import ray

    with guard("ray-current-cluster-file"):
        from ray._common.utils import get_ray_address_file

        assert get_ray_address_file("/tmp/ray") == "/tmp/ray/ray_current_cluster", \
            f"Ray records the last cluster in {get_ray_address_file('/tmp/ray')}"
        assert "ray_current_cluster" in (inspect.getdoc(ray.init) or ""), "ray.init's docstring no longer names it"


def test_ray_dashboard_still_answers_no_agent_with_this_text() -> None:
    from pipeline.local_cluster import AGENT_NOT_READY

    with guard("ray-job-agent-not-ready-text"):
        spec = importlib.util.find_spec("ray.dashboard.modules.job.job_head")
        assert spec is not None and spec.origin, "ray.dashboard.modules.job.job_head is gone"
        assert AGENT_NOT_READY in Path(spec.origin).read_text(), \
            f"the job head no longer answers {AGENT_NOT_READY!r}"


def test_ray_train_describes_a_failed_worker_with_its_node() -> None:
    from pipeline.trainer.job import _lost_worker_node

    with guard("ray-train-health-check-text"):
        from ray.exceptions import ActorUnavailableError
        from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
        from ray.train.v2._internal.execution.worker_group.worker import ActorMetadata

        metadata = ActorMetadata(hostname="h", node_id="81e6f099ad1e67f0", node_ip="10.0.0.3", pid=7,
                                 accelerator_ids={})
        err = WorkerHealthCheckFailedError(f"A worker health check failed.\nWorker info: {metadata!r}",
                                           ActorUnavailableError("unreachable", None))
        assert err.health_check_failure is not None, "WorkerHealthCheckFailedError lost health_check_failure"
        assert _lost_worker_node(err) == " on node 10.0.0.3 (node id 81e6f099ad1e)", \
            f"the worker's description no longer names its node as expected: {metadata!r}"


def test_argparse_subparsers_action() -> None:
    with guard("argparse-subparsers-action"):
        assert type(argparse.ArgumentParser().add_subparsers()) is argparse._SubParsersAction


def test_torch_save_writes_the_legacy_format_on_request() -> None:
    import torch

    with guard("torch-save-legacy-format"):
        assert "_use_new_zipfile_serialization" in _params(torch.save), \
            f"torch.save takes {_params(torch.save)}, no _use_new_zipfile_serialization"
        buffer = io.BytesIO()
        torch.save({"w": torch.zeros(2)}, buffer, _use_new_zipfile_serialization=False)
        buffer.seek(0)
        assert not zipfile.is_zipfile(buffer), "the legacy format is a zip archive now"
        buffer.seek(0)
        assert torch.equal(torch.load(buffer, weights_only=True)["w"], torch.zeros(2)), "torch no longer loads it"


# -- the scan: no private API in use that REGISTRY does not list ----------------------------------------------

def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_prefix(dotted: str) -> str | None:
    """The dotted path through its first private segment and one more: ``a._b.c.d`` -> ``a._b.c``,
    ``a.b._c`` -> ``a.b._c``; None when no segment is private."""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if _is_private(part):
            return ".".join(parts[: i + 2])
    return None


def _is_library(dotted: str) -> bool:
    return dotted.split(".")[0] not in PROJECT_PACKAGES


class _Scanner(ast.NodeVisitor):
    """Private names of libraries that one file uses: imports of private modules or names, attributes of
    imported library modules and classes, private keyword arguments in calls to them, getattr/setattr/hasattr
    with a private name on them, dotted library paths in strings, ``(module, name)`` string pairs, and
    inherited private members used by subclasses of library classes."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}
        self.found: set[str] = set()

    # names -> dotted library paths
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                self.aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]
            self._report(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or not node.module:
            return
        for alias in node.names:
            full = f"{node.module}.{alias.name}"
            self.aliases[alias.asname or alias.name] = full
            self._report(full)

    def visit_Assign(self, node: ast.Assign) -> None:
        module = self._module_lookup(node.value)
        if module:
            for target in node.targets:
                if isinstance(target, ast.Name):
                    self.aliases[target.id] = module
        self.generic_visit(node)

    def _module_lookup(self, node: ast.AST) -> str | None:
        """``importlib.import_module("m")``, ``sys.modules.get("m")``, ``sys.modules["m"]`` -> "m"."""
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = self._dotted(node.func) or ""
            if func.endswith("import_module") or func == "sys.modules.get":
                return node.args[0].value if isinstance(node.args[0].value, str) else None
        if isinstance(node, ast.Subscript) and self._dotted(node.value) == "sys.modules":
            key = node.slice
            return key.value if isinstance(key, ast.Constant) and isinstance(key.value, str) else None
        return None

    def _dotted(self, node: ast.AST) -> str | None:
        """The dotted path of a name or attribute chain, through the file's aliases."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        root = self.aliases.get(node.id, node.id if node.id in ("sys", "importlib") else None)
        return ".".join([root, *reversed(parts)]) if root else None

    def _report(self, dotted: str | None) -> None:
        if dotted and _is_library(dotted):
            prefix = _private_prefix(dotted)
            if prefix:
                self.found.add(prefix)

    # uses
    def visit_Attribute(self, node: ast.Attribute) -> None:
        dotted = self._dotted(node)
        if dotted is None:
            self.generic_visit(node)
        else:  # the whole chain at once: its inner links would report shorter paths of the same use
            self._report(dotted)

    def visit_Call(self, node: ast.Call) -> None:
        func = self._dotted(node.func)
        if func and _is_library(func):
            for keyword in node.keywords:
                if keyword.arg and _is_private(keyword.arg):
                    self.found.add(f"{func}({keyword.arg})")
        if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr", "hasattr") \
                and len(node.args) >= 2:
            owner, name = self._dotted(node.args[0]), node.args[1]
            if owner and isinstance(name, ast.Constant) and isinstance(name.value, str):
                self._report(f"{owner}.{name.value}")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and node.value.split(".")[0] in LIBRARY_ROOTS and \
                all(part.isidentifier() for part in node.value.split(".")):
            self._report(node.value)

    def visit_Tuple(self, node: ast.Tuple) -> None:
        values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
        if len(values) == 2 and all(isinstance(v, str) for v in values) and values[0].split(".")[0] in LIBRARY_ROOTS \
                and values[1].isidentifier():
            self._report(f"{values[0]}.{values[1]}")
        else:
            self.generic_visit(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        bases = [b for b in (self._dotted(base) for base in node.bases) if b and _is_library(b)]
        if bases:
            own = {n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            own |= {t.attr for n in ast.walk(node) if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self" \
                        and _is_private(sub.attr) and sub.attr not in own:
                    self.found.add(f"{bases[0]}.{sub.attr}")
        self.generic_visit(node)


@cache
def _private_uses() -> dict[str, set[str]]:
    """{file relative to the root: private library names it uses}."""
    uses: dict[str, set[str]] = {}
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.resolve() == THIS_FILE or ".venv" in path.parts:
                continue
            try:
                tree = ast.parse(path.read_text(), str(path))
            except SyntaxError as err:  # someone's edit in progress: the other tests will say so
                warnings.warn(f"not scanned: {err}", stacklevel=1)
                continue
            scanner = _Scanner()
            scanner.visit(tree)
            if scanner.found:
                uses[str(path.relative_to(ROOT))] = scanner.found
    return uses


def test_the_scan_sees_what_it_is_meant_to_see() -> None:
    """The scanner itself: each kind of private use it claims to catch is caught."""
    sample = '''
import argparse, sys, importlib
import torch.distributed as dist
from ray.train.torch.config import _TorchBackend
from decord._ffi.function import f
from torch.distributed.checkpoint import FileSystemReader
import ray
m = importlib.import_module("torch.distributed.rendezvous")
m._create_c10d_store = None
getattr(m, "_agent_store_serves", None)
sys.modules.get("ray._private.ray_constants")
ray.init(_node_ip_address="127.0.0.1")
x: argparse._SubParsersAction
dist._store
G = {("torch.serialization", "_get_layout"), ("pathlib._local", "PosixPath")}
class R(FileSystemReader):
    def read(self):
        self._own = 1
        return self._get_metadata_path(), self._own
'''
    scanner = _Scanner()
    scanner.visit(ast.parse(sample))
    assert scanner.found == {
        "ray.train.torch.config._TorchBackend", "decord._ffi.function", "ray._private.ray_constants",
        "torch.distributed.rendezvous._create_c10d_store", "torch.distributed.rendezvous._agent_store_serves",
        "ray.init(_node_ip_address)",
        "argparse._SubParsersAction", "torch.distributed._store", "torch.serialization._get_layout",
        "pathlib._local.PosixPath",
        "torch.distributed.checkpoint.FileSystemReader._get_metadata_path",
    }, scanner.found


# Underscore names the standard library documents as public API (not private, whatever the name says).
DOCUMENTED_UNDERSCORE = {
    "os._exit",  # https://docs.python.org/3/library/os.html#os._exit: how a forked child ends
}


def test_no_unregistered_private_api() -> None:
    """Every private library name the code uses is in REGISTRY, for the file that uses it."""
    registered = {(f, key) for entry in REGISTRY.values() for f in entry.where for key in entry.scan}
    unregistered = sorted((f, name) for f, names in _private_uses().items() for name in names
                          if (f, name) not in registered and name not in DOCUMENTED_UNDERSCORE)
    assert not unregistered, (
        "private APIs of dependencies used but not registered: "
        + "; ".join(f"{name} in {f}" for f, name in unregistered)
        + ". Use a public API instead, or add the API to REGISTRY in tests/test_private_apis.py with a guard "
        "test, a row in docs/versions.md, and a version bound for its library in pyproject.toml."
    )

